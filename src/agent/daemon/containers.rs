//! The agent's own dealings with the Docker engine, beside `docker compose`: the registry login
//! before a pull, the targeted workers (standalone worker containers, the seeds' `deploy.sh
//! start-worker`), recreating a compose service so it reads its env files again, and what
//! `/health` shows of the running containers.
//!
//! Env values never go into a command line. A targeted worker is recreated with `-e KEY` (the
//! name only): the docker CLI takes the value from its own environment, which the agent sets for
//! that one child process. The few names the CLI itself reads (`PATH`, `HOME`, `DOCKER_*`,
//! proxies, loader and Go runtime settings) go through an env file of the agent's own instead
//! (mode 0600, beside the state file).

use crate::agent::daemon::checks::compose_args;
use crate::agent::daemon::config::AgentConfig;
use crate::agent::daemon::exec::{self, CmdOutput, ExecError, Redactor};
use crate::agent::daemon::worker;
use crate::agent::envfile;
use crate::agent::protocol::TargetedWorker;
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// How a child process gets its environment.
#[derive(Default)]
pub enum ChildEnv {
    /// The agent's own.
    #[default]
    Inherit,
    /// Only what the docker CLI needs from the agent's, plus these.
    DockerPlus(Vec<(String, String)>),
}

/// Variables of the agent's environment a docker CLI child keeps under [`ChildEnv::DockerPlus`].
const CLI_PASSTHROUGH: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "XDG_RUNTIME_DIR",
    "XDG_CONFIG_HOME",
    "DOCKER_HOST",
    "DOCKER_CONFIG",
    "DOCKER_CONTEXT",
    "DOCKER_CERT_PATH",
    "DOCKER_TLS_VERIFY",
    "DOCKER_API_VERSION",
];

/// Whether the docker CLI (or the loader, or the Go runtime it is built with) reads `key` from its
/// environment: such a variable cannot carry a container's value to it.
pub fn cli_reads(key: &str) -> bool {
    let upper = key.to_ascii_uppercase();
    CLI_PASSTHROUGH.contains(&key)
        || upper.starts_with("DOCKER_")
        || upper.starts_with("LD_")
        || upper.ends_with("_PROXY")
        || upper.starts_with("XDG_")
        || matches!(
            upper.as_str(),
            "GODEBUG" | "GOMAXPROCS" | "GOGC" | "GOMEMLIMIT" | "GOTRACEBACK" | "GOFLAGS"
        )
}

/// Runs `program args...` (no shell), killed after `timeout`, output captured (bounded): like
/// [`crate::agent::daemon::exec::run`], with bytes for its stdin (then closed) and a chosen environment.
pub async fn run(
    program: &Path,
    args: &[OsString],
    stdin: Option<&[u8]>,
    env: ChildEnv,
    timeout: Duration,
) -> Result<CmdOutput, ExecError> {
    let name = program.display().to_string();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let ChildEnv::DockerPlus(extra) = env {
        cmd.env_clear();
        for k in CLI_PASSTHROUGH {
            if let Some(v) = std::env::var_os(k) {
                cmd.env(k, v);
            }
        }
        cmd.envs(extra);
    }
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
        program: name.clone(),
        source,
    })?;
    let input = child.stdin.take();
    let stdin = stdin.map(<[u8]>::to_vec);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let work = async move {
        let feed = async move {
            if let (Some(mut pipe), Some(bytes)) = (input, stdin) {
                // A child that exits without reading is reported by its exit status.
                let _ = pipe.write_all(&bytes).await;
                let _ = pipe.shutdown().await;
            }
        };
        let (_, o, e) = tokio::join!(feed, exec::read_bounded(stdout), exec::read_bounded(stderr));
        let status = child.wait().await;
        (status, o, e)
    };
    match tokio::time::timeout(timeout, work).await {
        Err(_) => Err(ExecError::Timeout {
            program: name,
            timeout,
        }),
        Ok((Err(source), _, _)) => Err(ExecError::Wait {
            program: name,
            source,
        }),
        Ok((Ok(status), stdout, stderr)) => Ok(CmdOutput {
            code: status.code(),
            stdout,
            stderr,
        }),
    }
}

/// The docker CLI of the configuration, with the agent's redactor.
#[derive(Clone)]
pub struct Engine<'a> {
    /// The configuration (docker binary, compose files, project).
    pub cfg: &'a AgentConfig,
    /// Masks secrets in command output and messages.
    pub redactor: &'a Redactor,
}

impl Engine<'_> {
    /// `docker ARGS`; `Ok(stdout)` when it exits 0, else `Err("docker SUB: exit status N: <tail
    /// of stderr>")`, redacted.
    pub async fn docker(&self, args: &[OsString], timeout: Duration) -> Result<String, String> {
        self.docker_env(args, ChildEnv::Inherit, timeout).await
    }

    async fn docker_env(
        &self,
        args: &[OsString],
        env: ChildEnv,
        timeout: Duration,
    ) -> Result<String, String> {
        let what = describe_args(args);
        match run(&self.cfg.docker.binary, args, None, env, timeout).await {
            Ok(out) if out.success() => Ok(out.stdout),
            Ok(out) => Err(format!("{what}: {}", out.describe(self.redactor))),
            Err(e) => Err(self.redactor.redact(&e.to_string())),
        }
    }

    fn timeout(&self) -> Duration {
        self.cfg.deploy.command_timeout.0
    }

    /// The configured registry login, if any. `Ok(None)`: none configured.
    pub async fn login(&self) -> Result<Option<String>, String> {
        let timeout = self.timeout();
        if let Some(argv) = &self.cfg.deploy.login_command {
            let (program, args) = argv
                .split_first()
                .ok_or_else(|| "login: empty command".to_string())?;
            let args: Vec<OsString> = args.iter().map(OsString::from).collect();
            return match run(Path::new(program), &args, None, ChildEnv::Inherit, timeout).await {
                Ok(out) if out.success() => Ok(Some("login: ok".into())),
                Ok(out) => Err(format!("login: {}", out.describe(self.redactor))),
                Err(e) => Err(format!("login: {}", self.redactor.redact(&e.to_string()))),
            };
        }
        let Some(l) = &self.cfg.deploy.login else {
            return Ok(None);
        };
        if let Some(sh) = &l.shell {
            let args: Vec<OsString> = vec!["-c".into(), sh.into()];
            return match run(
                Path::new("/bin/sh"),
                &args,
                None,
                ChildEnv::Inherit,
                timeout,
            )
            .await
            {
                Ok(out) if out.success() => {
                    let said = out.stdout.lines().rev().find(|l| !l.trim().is_empty());
                    Ok(Some(format!(
                        "login (shell command): {}",
                        self.redactor.redact(said.unwrap_or("ok").trim())
                    )))
                }
                Ok(out) => Err(format!(
                    "login (shell command): {}",
                    out.describe(self.redactor)
                )),
                Err(e) => Err(format!(
                    "login (shell command): {}",
                    self.redactor.redact(&e.to_string())
                )),
            };
        }
        let (Some(registry), Some(user), Some(pw_file)) =
            (&l.registry, &l.username, &l.password_file)
        else {
            return Err("login: neither a shell command nor credentials configured".into());
        };
        let text = tokio::fs::read_to_string(pw_file)
            .await
            .map_err(|e| format!("login: reading {}: {e}", pw_file.display()))?;
        let password = text.lines().next().unwrap_or("").trim_end().to_string();
        if password.is_empty() {
            return Err(format!("login: {} holds no password", pw_file.display()));
        }
        self.redactor
            .set_values("registry-password", [password.clone()]);
        let args: Vec<OsString> = vec![
            "login".into(),
            "--username".into(),
            user.into(),
            "--password-stdin".into(),
            registry.into(),
        ];
        let what = format!("docker login {registry} as {user}");
        match run(
            &self.cfg.docker.binary,
            &args,
            Some(password.as_bytes()),
            ChildEnv::Inherit,
            timeout,
        )
        .await
        {
            Ok(out) if out.success() => Ok(Some(format!("{what}: ok"))),
            Ok(out) => Err(format!("{what}: {}", out.describe(self.redactor))),
            Err(e) => Err(format!("{what}: {}", self.redactor.redact(&e.to_string()))),
        }
    }

    /// The tag of the image the worker's compose container runs, when there is one.
    pub async fn running_worker_tag(&self, timeout: Duration) -> Option<String> {
        let svc = self.cfg.docker.worker_service.as_str();
        let args = compose_args(self.cfg, &["ps", "--format", "json", svc]);
        let out = self.docker(&args, timeout).await.ok()?;
        compose_ps_entries(&out)
            .into_iter()
            .filter(|c| c.service == svc && c.state == "running")
            .find_map(|c| image_tag(&c.image).map(str::to_string))
    }

    /// `docker compose up -d --force-recreate --no-deps -t GRACE SERVICE`: a new container, so
    /// the service reads its env files again (`restart` would keep the old environment).
    pub async fn recreate_compose_service(
        &self,
        svc: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let grace = self.cfg.deploy.stop_grace.0.as_secs().to_string();
        let args = compose_args(
            self.cfg,
            &[
                "up",
                "-d",
                "--force-recreate",
                "--no-deps",
                "-t",
                &grace,
                svc,
            ],
        );
        self.docker(&args, timeout).await.map(|_| ())
    }

    /// The state of a compose service's containers: `Ok(())` once all run (and are healthy when
    /// they have a health check), `Err((final, why))`: `final` when waiting will not help.
    pub async fn compose_service_state(
        &self,
        svc: &str,
        timeout: Duration,
    ) -> Result<(), (bool, String)> {
        let args = compose_args(self.cfg, &["ps", "--all", "--format", "json", svc]);
        let out = self.docker(&args, timeout).await.map_err(|e| (false, e))?;
        let mine: Vec<ComposePsEntry> = compose_ps_entries(&out)
            .into_iter()
            .filter(|c| c.service == svc)
            .collect();
        if mine.is_empty() {
            return Err((false, format!("{svc} has no container")));
        }
        for c in &mine {
            if c.state != "running" {
                let final_ = matches!(c.state.as_str(), "exited" | "dead");
                return Err((final_, format!("{} is {}", c.name, c.state)));
            }
            match c.health.as_str() {
                "unhealthy" => return Err((false, format!("{} is unhealthy", c.name))),
                "starting" => return Err((false, format!("{} is starting", c.name))),
                _ => {}
            }
        }
        Ok(())
    }

    // ---- Targeted workers ----------------------------------------------------------------

    /// The targeted workers' containers (all states), inspected. Empty without a selector.
    pub async fn targeted_containers(&self, timeout: Duration) -> Result<Vec<Value>, String> {
        let sel = &self.cfg.targeted_workers.selector;
        if sel.is_empty() {
            return Ok(Vec::new());
        }
        let mut args: Vec<OsString> = vec!["ps".into(), "-a".into(), "--no-trunc".into()];
        for f in sel {
            args.push("--filter".into());
            args.push(format!("label={f}").into());
        }
        args.push("--format".into());
        args.push("{{.ID}}".into());
        let out = self
            .docker(&args, timeout)
            .await
            .map_err(|e| format!("listing targeted workers: {e}"))?;
        let ids: Vec<&str> = out
            .split_whitespace()
            .filter(|id| id.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut args: Vec<OsString> = vec!["inspect".into()];
        args.extend(ids.iter().map(OsString::from));
        let out = self
            .docker(&args, timeout)
            .await
            .map_err(|e| format!("inspecting targeted workers: {e}"))?;
        match serde_json::from_str::<Value>(&out) {
            Ok(Value::Array(v)) => Ok(v
                .into_iter()
                // A replacement being prepared is not a worker of its own.
                .filter(|c| !container_name(c).ends_with(NEXT_SUFFIX))
                .collect()),
            _ => Err("docker inspect printed no JSON array".into()),
        }
    }

    /// The targeted workers as `/health` lists them.
    pub async fn targeted_report(&self, timeout: Duration) -> Result<Vec<TargetedWorker>, String> {
        let port_key = &self.cfg.targeted_workers.port_key;
        Ok(self
            .targeted_containers(timeout)
            .await?
            .iter()
            .map(|c| {
                let image = str_at(c, &["Config", "Image"]).to_string();
                TargetedWorker {
                    name: container_name(c).to_string(),
                    worker_id: c
                        .pointer("/Config/Labels/gh.worker_id")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    image_tag: image_tag(&image).map(str::to_string),
                    image,
                    state: str_at(c, &["State", "Status"]).to_string(),
                    port: env_of(c)
                        .get(port_key.as_str())
                        .and_then(|p| p.parse().ok()),
                }
            })
            .collect())
    }

    /// What it takes to start each running targeted worker again (see [`WorkerSpec`]).
    pub async fn targeted_specs(&self) -> Result<Vec<WorkerSpec>, String> {
        let timeout = self.timeout();
        let containers = self.targeted_containers(timeout).await?;
        let mut images: BTreeMap<String, Value> = BTreeMap::new();
        let mut specs = Vec::new();
        for c in containers
            .iter()
            .filter(|c| bool_at(c, &["State", "Running"]))
        {
            let image_id = str_at(c, &["Image"]).to_string();
            if !images.contains_key(&image_id) {
                let args: Vec<OsString> =
                    vec!["image".into(), "inspect".into(), (&image_id).into()];
                let out = self.docker(&args, timeout).await?;
                let v = match serde_json::from_str::<Value>(&out) {
                    Ok(Value::Array(mut a)) if !a.is_empty() => a.swap_remove(0),
                    _ => return Err(format!("docker image inspect {image_id}: no JSON")),
                };
                images.insert(image_id.clone(), v);
            }
            specs.push(WorkerSpec::from_inspect(
                c,
                &images[&image_id],
                &self.cfg.targeted_workers,
            )?);
        }
        Ok(specs)
    }

    /// Asks every worker with a known port to drain and waits (all together, at most
    /// `deploy.drainTimeout`) until each is deploy-safe. Returns a sentence per worker that was
    /// not.
    pub async fn drain_targeted(
        &self,
        http: &reqwest::Client,
        specs: &[WorkerSpec],
    ) -> Vec<String> {
        let t = &self.cfg.targeted_workers;
        let d = &self.cfg.deploy;
        let probe = self.cfg.probe_timeout.0;
        let waits = specs
            .iter()
            .filter_map(|s| s.port.map(|p| (s, p)))
            .map(|(s, port)| {
                let status = t.status_url.replace("{port}", &port.to_string());
                let drain = t.drain_url.replace("{port}", &port.to_string());
                async move {
                    let asked = worker::request_drain(http, &drain, probe).await;
                    let (safe, _) = crate::agent::daemon::deploy::wait_deploy_safe(
                        http,
                        &status,
                        d.drain_timeout.0,
                        d.drain_poll_interval.0,
                        probe,
                    )
                    .await;
                    match (safe, asked) {
                        (true, _) => None,
                        (false, Err(e)) => Some(format!("{} (drain: {e})", s.name)),
                        (false, Ok(())) => Some(format!("{} not deploy-safe", s.name)),
                    }
                }
            });
        futures::future::join_all(waits)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Replaces the worker `spec` describes by a new container from `image` (`repository:tag`):
    /// the same name, labels, limits, network, ports, mounts and command, with the env files read
    /// now and its own variables. The new container is created first (a bad image or setting
    /// leaves the old one running), then the old one is stopped with the grace and removed, and
    /// the new one started and checked.
    pub async fn replace_worker(
        &self,
        http: &reqwest::Client,
        spec: &WorkerSpec,
        image: &str,
    ) -> Result<(), String> {
        let timeout = self.timeout();
        let name = &spec.name;
        let next = format!("{name}{NEXT_SUFFIX}");
        let (env_pass, env_file) = self.worker_env(spec).await?;
        // A leftover from an interrupted replacement.
        let _ = self
            .docker(&["rm".into(), "-f".into(), (&next).into()], timeout)
            .await;
        let mut args: Vec<OsString> = vec!["create".into(), "--name".into(), (&next).into()];
        args.extend(spec.flags.iter().cloned());
        for k in env_pass.iter().map(|(k, _)| k) {
            args.push("-e".into());
            args.push(k.into());
        }
        if let Some(f) = &env_file {
            args.push("--env-file".into());
            args.push(f.into());
        }
        if let Some(ep) = &spec.entrypoint {
            args.push("--entrypoint".into());
            args.push(ep.into());
        }
        args.push(image.into());
        args.extend(spec.cmd.iter().map(OsString::from));
        self.docker_env(&args, ChildEnv::DockerPlus(env_pass), timeout)
            .await
            .map_err(|e| format!("{name}: creating its replacement: {e}"))?;
        let grace = self.cfg.deploy.stop_grace.0;
        let stop: Vec<OsString> = vec![
            "stop".into(),
            "-t".into(),
            grace.as_secs().to_string().into(),
            name.into(),
        ];
        // A missing container (a rollback after a failed replacement) is fine.
        if let Err(e) = self.docker(&stop, grace + timeout).await
            && !e.contains("No such container")
        {
            let _ = self
                .docker(&["rm".into(), "-f".into(), (&next).into()], timeout)
                .await;
            return Err(format!("{name}: stopping it: {e}"));
        }
        if let Err(e) = self
            .docker(&["rm".into(), "-f".into(), name.into()], timeout)
            .await
            && !e.contains("No such container")
        {
            return Err(format!("{name}: removing it: {e}"));
        }
        self.docker(&["rename".into(), (&next).into(), name.into()], timeout)
            .await
            .map_err(|e| format!("{name}: renaming its replacement: {e}"))?;
        self.docker(&["start".into(), name.into()], timeout)
            .await
            .map_err(|e| format!("{name}: starting it: {e}"))?;
        self.wait_worker(http, spec).await
    }

    /// Waits until a (re)started worker answers on its status port, or runs when it has none.
    async fn wait_worker(&self, http: &reqwest::Client, spec: &WorkerSpec) -> Result<(), String> {
        let d = &self.cfg.deploy;
        let mut last = String::new();
        for attempt in 1..=d.health_check_tries {
            let r = match spec.port {
                Some(port) => {
                    let url = self
                        .cfg
                        .targeted_workers
                        .status_url
                        .replace("{port}", &port.to_string());
                    worker::fetch_status(http, &url, d.health_check_timeout.0)
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("status port {port}: {e}"))
                }
                None => self.container_running(&spec.name).await,
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            if attempt < d.health_check_tries {
                tokio::time::sleep(d.health_check_interval.0).await;
            }
        }
        Err(format!(
            "{}: not answering after {} tries {} apart (last: {last})",
            spec.name, d.health_check_tries, d.health_check_interval
        ))
    }

    async fn container_running(&self, name: &str) -> Result<(), String> {
        let args: Vec<OsString> = vec![
            "inspect".into(),
            "--format".into(),
            "{{.State.Status}}".into(),
            name.into(),
        ];
        let out = self.docker(&args, self.cfg.probe_timeout.0).await?;
        match out.trim() {
            "running" => Ok(()),
            s => Err(format!("{name} is {s}")),
        }
    }

    /// The image a running container `name` was created from (`Config.Image`).
    pub async fn container_image(&self, name: &str) -> Option<(String, bool)> {
        let args: Vec<OsString> = vec![
            "inspect".into(),
            "--format".into(),
            "{{.Config.Image}} {{.State.Running}}".into(),
            name.into(),
        ];
        let out = self.docker(&args, self.cfg.probe_timeout.0).await.ok()?;
        let mut it = out.split_whitespace();
        Some((it.next()?.to_string(), it.next() == Some("true")))
    }

    /// The variables a recreated worker gets: its env files (read now, later files win) and its
    /// own variables. Returns those passed through the CLI's environment and, for the names the
    /// CLI reads itself, the agent's env file holding them.
    async fn worker_env(
        &self,
        spec: &WorkerSpec,
    ) -> Result<(Vec<(String, String)>, Option<PathBuf>), String> {
        let mut vars: BTreeMap<String, String> = BTreeMap::new();
        for path in self.cfg.targeted_env_files() {
            let bytes = tokio::fs::read(&path)
                .await
                .map_err(|e| format!("{}: reading {}: {e}", spec.name, path.display()))?;
            let f = envfile::parse_bytes(&bytes).map_err(|e| {
                format!(
                    "{}: {} is not a valid env file: {e}",
                    spec.name,
                    path.display()
                )
            })?;
            self.redactor.set(
                &format!("targeted-env:{}", path.display()),
                crate::redact::Secrets::from_env_text(
                    &String::from_utf8_lossy(&bytes),
                    &[self.cfg.deploy.image_tag_key.as_str()],
                ),
            );
            vars.extend(f.to_map());
        }
        for (k, v) in &spec.own_env {
            vars.insert(k.clone(), v.clone());
        }
        let (file_vars, pass): (Vec<_>, Vec<_>) = vars.into_iter().partition(|(k, _)| cli_reads(k));
        let path = self.own_env_path(&spec.name);
        if file_vars.is_empty() {
            let _ = tokio::fs::remove_file(&path).await;
            return Ok((pass, None));
        }
        let mut text = String::new();
        for (k, v) in &file_vars {
            if v.contains(['\n', '\r']) {
                return Err(format!(
                    "{}: the value of {k} spans lines, which docker's --env-file cannot carry (and {k} is read by the docker CLI itself)",
                    spec.name
                ));
            }
            text.push_str(&format!("{k}={v}\n"));
        }
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        let p = path.clone();
        tokio::task::spawn_blocking(move || envfile::write_atomic(&p, text.as_bytes(), 0o600))
            .await
            .map_err(|e| format!("env file writer panicked: {e}"))?
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok((pass, Some(path)))
    }

    fn own_env_path(&self, name: &str) -> PathBuf {
        let dir = self
            .cfg
            .state_file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        dir.join("targeted").join(format!("{name}.env"))
    }
}

/// What the engine shows of the instance's containers, for `/health`.
#[derive(Debug, Clone, Default)]
pub struct EngineView {
    /// When the look began (`None`: never looked).
    pub taken_at: Option<jiff::Timestamp>,
    /// The tag of the image the worker's compose container runs.
    pub running_tag: Option<String>,
    /// The standalone worker containers the deploy recreates, as they run now.
    pub targeted: Vec<TargetedWorker>,
}

impl EngineView {
    /// Looks (each docker call bounded by `probeTimeout`). What cannot be seen is left out.
    pub async fn observe(cfg: &AgentConfig, redactor: &Redactor) -> EngineView {
        let taken_at = jiff::Timestamp::now();
        let e = Engine { cfg, redactor };
        let t = cfg.probe_timeout.0;
        let (running_tag, targeted) = tokio::join!(e.running_worker_tag(t), e.targeted_report(t));
        EngineView {
            taken_at: Some(taken_at),
            running_tag,
            targeted: targeted.unwrap_or_default(),
        }
    }
}

/// The name suffix of a targeted worker's replacement while it is being prepared.
pub const NEXT_SUFFIX: &str = ".next";

/// `docker SUB ...` in a few words for messages: the subcommand and what follows it, up to the
/// first option that carries a value.
fn describe_args(args: &[OsString]) -> String {
    let words: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if words.first().map(String::as_str) == Some("compose") {
        // Skip the project options (-p, -f, --project-directory, --env-file and their values).
        let mut i = 1;
        while i < words.len() && words[i].starts_with('-') {
            i += 2;
        }
        return format!("docker compose {}", words[i.min(words.len())..].join(" "));
    }
    let n = words
        .iter()
        .position(|w| w.starts_with('-'))
        .unwrap_or(words.len())
        .min(2);
    format!("docker {}", words[..n].join(" "))
}

/// How to start a targeted worker again, read from `docker inspect` of its container and of its
/// image. Holds no env file value: those are read when it is started.
#[derive(Clone)]
pub struct WorkerSpec {
    /// The container's name.
    pub name: String,
    /// The image repository (no tag) and the tag it ran.
    pub repository: String,
    /// The tag it ran, when its image reference had one.
    pub tag: Option<String>,
    /// `docker create` options: labels, limits, network, ports, mounts, restart policy, user.
    pub flags: Vec<OsString>,
    /// `--entrypoint`, when it differs from the image's (its first word; the rest go before
    /// `cmd`).
    pub entrypoint: Option<String>,
    /// The command, when it differs from the image's.
    pub cmd: Vec<String>,
    /// Its own variables (`targetedWorkers.ownKeys`), from the container's environment.
    pub own_env: BTreeMap<String, String>,
    /// Its status port.
    pub port: Option<u16>,
}

impl std::fmt::Debug for WorkerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSpec")
            .field("name", &self.name)
            .field("repository", &self.repository)
            .field("tag", &self.tag)
            .field("flags", &self.flags)
            .field("cmd", &self.cmd)
            .field("own_keys", &self.own_env.keys().collect::<Vec<_>>())
            .field("port", &self.port)
            .finish()
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    path.iter()
        .try_fold(v, |v, k| v.get(*k))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn bool_at(v: &Value, path: &[&str]) -> bool {
    path.iter()
        .try_fold(v, |v, k| v.get(*k))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn i64_at(v: &Value, path: &[&str]) -> i64 {
    path.iter()
        .try_fold(v, |v, k| v.get(*k))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn strings_at(v: &Value, path: &[&str]) -> Vec<String> {
    path.iter()
        .try_fold(v, |v, k| v.get(*k))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn container_name(c: &Value) -> &str {
    str_at(c, &["Name"]).trim_start_matches('/')
}

/// `Config.Env` as a map.
fn env_of(c: &Value) -> BTreeMap<&str, &str> {
    c.pointer("/Config/Env")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .filter_map(|kv| kv.split_once('='))
                .collect()
        })
        .unwrap_or_default()
}

/// `repo[:port]/name:tag` → `tag` (none for an ID or a digest).
pub fn image_tag(image: &str) -> Option<&str> {
    let (repo, tag) = split_image(image);
    (!repo.is_empty()).then_some(tag).flatten()
}

/// `repo[:port]/name:tag@digest` → (`repo[:port]/name`, `Some(tag)`).
pub fn split_image(image: &str) -> (&str, Option<&str>) {
    let image = image.split('@').next().unwrap_or(image);
    if image.starts_with("sha256:") {
        return ("", None);
    }
    let last_slash = image.rfind('/').map(|i| i + 1).unwrap_or(0);
    match image[last_slash..].rfind(':') {
        Some(i) => (&image[..last_slash + i], Some(&image[last_slash + i + 1..])),
        None => (image, None),
    }
}

impl WorkerSpec {
    /// Reads a container's `docker inspect` and its image's.
    pub fn from_inspect(
        c: &Value,
        image: &Value,
        cfg: &crate::agent::daemon::config::TargetedWorkersConfig,
    ) -> Result<WorkerSpec, String> {
        let name = container_name(c).to_string();
        let config_image = str_at(c, &["Config", "Image"]);
        let (repo, tag) = split_image(config_image);
        let repository = match (&cfg.image, repo) {
            (Some(r), _) => r.clone(),
            (None, "") => {
                return Err(format!(
                    "{name}: cannot tell the repository of its image {config_image}; set targetedWorkers.image"
                ));
            }
            (None, r) => r.to_string(),
        };
        let mut flags: Vec<OsString> = Vec::new();
        let mut push = |k: &str, v: String| {
            flags.push(k.into());
            flags.push(v.into());
        };
        // Labels of the container that its image did not give it.
        let image_labels = image
            .pointer("/Config/Labels")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if let Some(labels) = c.pointer("/Config/Labels").and_then(Value::as_object) {
            for (k, v) in labels {
                let v = v.as_str().unwrap_or("");
                if image_labels.get(k).and_then(Value::as_str) == Some(v) {
                    continue;
                }
                push("--label", format!("{k}={v}"));
            }
        }
        let hc = |k: &str| i64_at(c, &["HostConfig", k]);
        let memory = hc("Memory");
        if memory > 0 {
            push("--memory", format!("{memory}b"));
        }
        let swap = hc("MemorySwap");
        if swap == -1 || (swap > 0 && swap != 2 * memory) {
            push("--memory-swap", swap.to_string());
        }
        let reservation = hc("MemoryReservation");
        if reservation > 0 {
            push("--memory-reservation", format!("{reservation}b"));
        }
        let nano = hc("NanoCpus");
        if nano > 0 {
            push("--cpus", format!("{}", nano as f64 / 1e9));
        }
        for (key, flag) in [
            ("CpuQuota", "--cpu-quota"),
            ("CpuPeriod", "--cpu-period"),
            ("CpuShares", "--cpu-shares"),
            ("PidsLimit", "--pids-limit"),
        ] {
            let v = hc(key);
            if v > 0 {
                push(flag, v.to_string());
            }
        }
        let cpuset = str_at(c, &["HostConfig", "CpusetCpus"]);
        if !cpuset.is_empty() {
            push("--cpuset-cpus", cpuset.to_string());
        }
        let net = str_at(c, &["HostConfig", "NetworkMode"]);
        if !net.is_empty() && net != "default" {
            push("--network", net.to_string());
        }
        if let Some(ports) = c
            .pointer("/HostConfig/PortBindings")
            .and_then(Value::as_object)
        {
            for (container_port, bindings) in ports {
                for b in bindings.as_array().into_iter().flatten() {
                    let ip = str_at(b, &["HostIp"]);
                    let host = str_at(b, &["HostPort"]);
                    let spec = match (ip.is_empty(), host.is_empty()) {
                        (true, true) => container_port.clone(),
                        (true, false) => format!("{host}:{container_port}"),
                        (false, _) => format!("{ip}:{host}:{container_port}"),
                    };
                    push("--publish", spec);
                }
            }
        }
        for bind in strings_at(c, &["HostConfig", "Binds"]) {
            push("--volume", bind);
        }
        let restart = str_at(c, &["HostConfig", "RestartPolicy", "Name"]);
        if !restart.is_empty() && restart != "no" {
            let max = i64_at(c, &["HostConfig", "RestartPolicy", "MaximumRetryCount"]);
            if restart == "on-failure" && max > 0 {
                push("--restart", format!("on-failure:{max}"));
            } else {
                push("--restart", restart.to_string());
            }
        }
        let user = str_at(c, &["Config", "User"]);
        if !user.is_empty() && user != str_at(image, &["Config", "User"]) {
            push("--user", user.to_string());
        }
        let wd = str_at(c, &["Config", "WorkingDir"]);
        if !wd.is_empty() && wd != str_at(image, &["Config", "WorkingDir"]) {
            push("--workdir", wd.to_string());
        }
        if c.pointer("/HostConfig/Init").and_then(Value::as_bool) == Some(true) {
            flags.push("--init".into());
        }
        let entry = strings_at(c, &["Config", "Entrypoint"]);
        let cmd = strings_at(c, &["Config", "Cmd"]);
        let (entrypoint, cmd) = if entry != strings_at(image, &["Config", "Entrypoint"]) {
            match entry.split_first() {
                Some((first, rest)) => {
                    let mut all = rest.to_vec();
                    all.extend(cmd);
                    (Some(first.clone()), all)
                }
                None => (Some(String::new()), cmd),
            }
        } else if cmd != strings_at(image, &["Config", "Cmd"]) {
            (None, cmd)
        } else {
            (None, Vec::new())
        };
        let env = env_of(c);
        let own_env: BTreeMap<String, String> = cfg
            .own_keys
            .iter()
            .filter_map(|k| env.get(k.as_str()).map(|v| (k.clone(), v.to_string())))
            .collect();
        let port = env.get(cfg.port_key.as_str()).and_then(|p| p.parse().ok());
        Ok(WorkerSpec {
            name,
            repository,
            tag: tag.map(str::to_string),
            flags,
            entrypoint,
            cmd,
            own_env,
            port,
        })
    }

    /// `repository:tag`.
    pub fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.repository)
    }
}

/// One container of `docker compose ps --format json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposePsEntry {
    /// The compose service.
    pub service: String,
    /// The container's name.
    pub name: String,
    /// The image reference it runs.
    pub image: String,
    /// Its state (`running`, `exited`, ...).
    pub state: String,
    /// Its health (`healthy`, `unhealthy`, `starting`, or empty without a health check).
    pub health: String,
}

/// Parses `docker compose ps --format json`: a JSON array (compose < 2.21) or one object per line.
pub fn compose_ps_entries(out: &str) -> Vec<ComposePsEntry> {
    let values: Vec<Value> = match serde_json::from_str::<Value>(out.trim()) {
        Ok(Value::Array(a)) => a,
        Ok(v @ Value::Object(_)) => vec![v],
        _ => out
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .collect(),
    };
    values
        .iter()
        .map(|v| ComposePsEntry {
            service: str_at(v, &["Service"]).to_string(),
            name: str_at(v, &["Name"]).to_string(),
            image: str_at(v, &["Image"]).to_string(),
            state: str_at(v, &["State"]).to_lowercase(),
            health: str_at(v, &["Health"]).to_lowercase(),
        })
        .collect()
}

/// Waits up to `tries` x `interval` for a 2xx from `url`.
pub async fn wait_http_ok(
    http: &reqwest::Client,
    url: &str,
    tries: u32,
    interval: Duration,
    timeout: Duration,
) -> Result<u32, String> {
    let mut last = String::new();
    for attempt in 1..=tries {
        match worker::check_health(http, url, timeout).await {
            Ok(()) => return Ok(attempt),
            Err(e) => last = e,
        }
        if attempt < tries {
            tokio::time::sleep(interval).await;
        }
    }
    Err(format!(
        "not healthy after {tries} tries {:?} apart (last: {last})",
        interval
    ))
}

/// Elapsed time in a message.
pub fn secs(since: Instant) -> String {
    format!("{:.1}s", since.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::daemon::config::TargetedWorkersConfig;
    use serde_json::json;

    #[test]
    fn image_names() {
        assert_eq!(
            split_image("127.0.0.1:5000/gh:v1"),
            ("127.0.0.1:5000/gh", Some("v1"))
        );
        assert_eq!(
            split_image("127.0.0.1:5000/gh"),
            ("127.0.0.1:5000/gh", None)
        );
        assert_eq!(split_image("gh:v2@sha256:abc"), ("gh", Some("v2")));
        assert_eq!(image_tag("sha256:0123"), None);
        assert_eq!(image_tag("a/b/c:t"), Some("t"));
    }

    #[test]
    fn cli_variables_are_recognised() {
        for k in [
            "PATH",
            "HOME",
            "DOCKER_HOST",
            "docker_x",
            "HTTPS_PROXY",
            "no_proxy",
            "LD_PRELOAD",
            "GODEBUG",
        ] {
            assert!(cli_reads(k), "{k}");
        }
        for k in ["DATABASE_URL", "GH_WORKER_ID", "GOOGLE_API_KEY", "PATHS"] {
            assert!(!cli_reads(k), "{k}");
        }
    }

    #[test]
    fn spec_keeps_what_the_container_was_given() {
        let c = json!({
            "Name": "/gh-worker-abc",
            "Image": "sha256:1111",
            "State": {"Status": "running", "Running": true},
            "Config": {
                "Image": "127.0.0.1:5000/ghosthands:v1",
                "Env": ["PATH=/bin", "GH_WORKER_ID=abc", "GH_WORKER_PORT=3112", "SECRET=s3cr3t-value"],
                "Cmd": ["worker"],
                "Entrypoint": ["/gh-worker"],
                "Labels": {"gh.role": "targeted-worker", "gh.worker_id": "abc", "build": "v1"},
            },
            "HostConfig": {
                "Memory": 2147483648i64, "MemorySwap": 4294967296i64, "NanoCpus": 2000000000i64,
                "NetworkMode": "host", "PortBindings": {},
                "RestartPolicy": {"Name": "unless-stopped", "MaximumRetryCount": 0},
                "Binds": ["/tmp/.X11-unix:/tmp/.X11-unix:rw"],
            },
        });
        let image = json!({"Config": {"Entrypoint": ["/gh-worker"], "Cmd": null, "Labels": {"build": "v1"}}});
        let s = WorkerSpec::from_inspect(&c, &image, &TargetedWorkersConfig::default()).unwrap();
        assert_eq!(s.name, "gh-worker-abc");
        assert_eq!(s.repository, "127.0.0.1:5000/ghosthands");
        assert_eq!(s.tag.as_deref(), Some("v1"));
        assert_eq!(s.image("v2"), "127.0.0.1:5000/ghosthands:v2");
        let flags: Vec<String> = s.flags.iter().map(|f| f.to_string_lossy().into()).collect();
        let joined = flags.join(" ");
        for want in [
            "--label gh.role=targeted-worker",
            "--label gh.worker_id=abc",
            "--memory 2147483648b",
            "--cpus 2",
            "--network host",
            "--restart unless-stopped",
            "--volume /tmp/.X11-unix:/tmp/.X11-unix:rw",
        ] {
            assert!(joined.contains(want), "{want} missing from {joined}");
        }
        // The image's own label comes from the new image; swap is the default (2x memory).
        assert!(
            !joined.contains("build=v1") && !joined.contains("memory-swap"),
            "{joined}"
        );
        assert_eq!(s.cmd, vec!["worker"]);
        assert_eq!(s.entrypoint, None);
        assert_eq!(s.port, Some(3112));
        assert_eq!(
            s.own_env.keys().collect::<Vec<_>>(),
            vec!["GH_WORKER_ID", "GH_WORKER_PORT"]
        );
        // Nothing of the environment but the own keys, and Debug shows no value.
        assert!(!joined.contains("s3cr3t"));
        assert!(!format!("{s:?}").contains("GH_WORKER_ID=abc"), "{s:?}");
        assert!(!format!("{s:?}").contains("s3cr3t"));
    }

    #[test]
    fn an_image_id_needs_a_configured_repository() {
        let c = json!({"Name": "/w", "Config": {"Image": "sha256:abcd"}, "HostConfig": {}});
        let e = WorkerSpec::from_inspect(&c, &json!({}), &TargetedWorkersConfig::default())
            .unwrap_err();
        assert!(e.contains("targetedWorkers.image"), "{e}");
        let cfg = TargetedWorkersConfig {
            image: Some("reg/gh".into()),
            ..Default::default()
        };
        let s = WorkerSpec::from_inspect(&c, &json!({}), &cfg).unwrap();
        assert_eq!(s.image("v3"), "reg/gh:v3");
    }

    #[test]
    fn compose_ps_with_images() {
        let out = "{\"Service\":\"worker\",\"Name\":\"p-worker-1\",\"Image\":\"r/gh:v2\",\"State\":\"running\",\"Health\":\"\"}\n";
        let e = compose_ps_entries(out);
        assert_eq!(e[0].image, "r/gh:v2");
        assert_eq!(image_tag(&e[0].image), Some("v2"));
    }

    #[test]
    fn described_commands_skip_project_options() {
        let args: Vec<OsString> = [
            "compose",
            "-p",
            "x",
            "-f",
            "a.yml",
            "--env-file",
            "e",
            "up",
            "-d",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(describe_args(&args), "docker compose up -d");
        let args: Vec<OsString> = ["create", "--name", "n"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(describe_args(&args), "docker create");
        let args: Vec<OsString> = ["image", "inspect", "x"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(describe_args(&args), "docker image inspect");
    }
}
