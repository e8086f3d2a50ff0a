//! The deploy: `gh-deploy.sh` as a state machine.
//!
//! ```text
//! record_previous -> set_image_tag -> login -> pull -> drain -> stop_worker -> up -> health_check -> succeeded
//!        |                 |            |        |                   |          |          |
//!        v                 v            +--------+------> rollback_image_tag <--+----------+
//!      failed            failed                                   |
//!                                  (worker untouched) rolled_back <+-> rollback_up -> rollback_health_check -> rolled_back
//!                                                                        |                    |
//!                                                                        v                    v
//!                                                                      failed               failed
//! ```
//!
//! `up` also replaces the targeted workers (standalone containers, see
//! [`crate::agent::daemon::containers`]) on the new tag, and `rollback_up` puts them back on the image
//! each ran before. A drain that times out stops the worker anyway (`onDrainTimeout: proceed`,
//! as `gh-deploy.sh` did) or fails the step (`abort`).
//!
//! [`next_step`] is the pure transition function; [`run_deploy`] drives it through a
//! [`DeployOps`] (the docker and HTTP edges, [`CommandOps`] in production), recording every step
//! in the [`DeployManager`], which keeps the current deploy in memory for `/health` and persists
//! it to the state file after every change, atomically. An agent that restarts finds a deploy
//! still marked running in that file and marks it failed ("agent restarted during deploy at step
//! X"), so `/health` never says running forever.

use crate::agent::daemon::checks::compose_args;
use crate::agent::daemon::config::{AgentConfig, DrainTimeoutAction};
use crate::agent::daemon::containers::{self, Engine, WorkerSpec};
use crate::agent::daemon::exec::{self, Redactor};
use crate::agent::daemon::worker;
use crate::agent::envfile;
use crate::agent::protocol::{DeployInfo, DeployState, DeployStep, StepRecord, StepStatus};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// What a step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It worked.
    Ok(String),
    /// Not quite, and the deploy goes on (a drain that timed out).
    Warn(String),
    /// Nothing to do.
    Skipped(String),
    /// It failed: the deploy stops (or rolls back).
    Failed(String),
}

impl Outcome {
    /// Whether the step failed.
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failed(_))
    }
    /// What the step said, in a sentence.
    pub fn message(&self) -> &str {
        match self {
            Outcome::Ok(m) | Outcome::Warn(m) | Outcome::Skipped(m) | Outcome::Failed(m) => m,
        }
    }
    fn status(&self) -> StepStatus {
        match self {
            Outcome::Ok(_) => StepStatus::Succeeded,
            Outcome::Warn(_) => StepStatus::Warning,
            Outcome::Skipped(_) => StepStatus::Skipped,
            Outcome::Failed(_) => StepStatus::Failed,
        }
    }
}

/// What comes after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Run this step.
    Run(DeployStep),
    /// The deploy ends in this state.
    Finish(DeployState),
}

/// The transition function. `worker_touched`: the worker was stopped (or the stop was tried), so
/// a rollback must bring the old tag up again rather than just restore the env file.
pub fn next_step(step: DeployStep, ok: bool, worker_touched: bool) -> Next {
    use DeployState::*;
    use DeployStep::*;
    match (step, ok) {
        (RecordPrevious, true) => Next::Run(SetImageTag),
        // Nothing changed yet: there is nothing to roll back.
        (RecordPrevious, false) | (SetImageTag, false) => Next::Finish(Failed),
        (SetImageTag, true) => Next::Run(Login),
        (Login, true) => Next::Run(Pull),
        (Pull, true) => Next::Run(Drain),
        (Drain, true) => Next::Run(StopWorker),
        (StopWorker, true) => Next::Run(Up),
        (Up, true) => Next::Run(HealthCheck),
        (HealthCheck, true) => Next::Finish(Succeeded),
        (Login | Pull | Drain | StopWorker | Up | HealthCheck, false) => {
            Next::Run(RollbackImageTag)
        }
        (RollbackImageTag, true) if worker_touched => Next::Run(RollbackUp),
        (RollbackImageTag, true) => Next::Finish(RolledBack),
        (RollbackUp, true) => Next::Run(RollbackHealthCheck),
        (RollbackHealthCheck, true) => Next::Finish(RolledBack),
        (RollbackImageTag | RollbackUp | RollbackHealthCheck, false) => Next::Finish(Failed),
        (DeployStep::Unknown, _) => Next::Finish(Failed),
    }
}

/// The edges a deploy acts on.
pub trait DeployOps: Send + Sync + 'static {
    /// The tag the env file names now (`None`: it names none).
    fn read_tag(&self) -> impl Future<Output = Result<Option<String>, String>> + Send;
    /// Runs one step other than `RecordPrevious`. `tag` is the new tag, `previous` the old one.
    fn run_step(
        &self,
        step: DeployStep,
        tag: &str,
        previous: Option<&str>,
    ) -> impl Future<Output = Outcome> + Send;
}

/// The state file's content.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StateFile {
    version: u32,
    #[serde(default)]
    deploy: Option<DeployInfo>,
}

/// The current or last deploy, shared by the deploy task and `/health`, persisted to a file.
#[derive(Debug)]
pub struct DeployManager {
    current: RwLock<Option<DeployInfo>>,
    state_file: PathBuf,
    persist_lock: tokio::sync::Mutex<()>,
    counter: AtomicU64,
    /// Every message is masked with it before it is kept, persisted or logged.
    redactor: Redactor,
}

impl DeployManager {
    /// Loads the state file. A deploy it says is running was cut short by a restart of the agent:
    /// it is marked failed (and the file rewritten). Returns the manager and, in that case, the
    /// message recorded.
    pub fn load(state_file: &Path) -> (Self, Option<String>) {
        Self::load_with(state_file, Redactor::default())
    }

    /// [`Self::load`], masking every message of every deploy with `redactor` (the agent's).
    pub fn load_with(state_file: &Path, redactor: Redactor) -> (Self, Option<String>) {
        let mut warning = None;
        let mut deploy = match std::fs::read(state_file) {
            Ok(bytes) => match serde_json::from_slice::<StateFile>(&bytes) {
                Ok(s) => s.deploy,
                Err(e) => {
                    warning = Some(format!(
                        "state file {} is not valid ({e}); starting without deploy history",
                        state_file.display()
                    ));
                    None
                }
            },
            Err(_) => None,
        };
        let mut recovered = false;
        if let Some(d) = deploy.as_mut()
            && d.state == DeployState::Running
        {
            let now = Timestamp::now();
            let msg = format!(
                "{INTERRUPTED} at step {}; the instance may run either tag",
                d.step
            );
            if let Some(s) = d.steps.last_mut()
                && s.status == StepStatus::Running
            {
                s.status = StepStatus::Failed;
                s.message = "interrupted: agent restarted".into();
                s.finished_at = Some(now);
            }
            d.state = DeployState::Failed;
            d.message = msg.clone();
            d.finished_at = Some(now);
            warning = Some(msg);
            recovered = true;
        }
        let mgr = Self {
            current: RwLock::new(deploy),
            state_file: state_file.to_path_buf(),
            persist_lock: tokio::sync::Mutex::new(()),
            counter: AtomicU64::new(0),
            redactor,
        };
        if recovered && let Err(e) = mgr.write_state_file() {
            warning = Some(format!(
                "{}; and the state file could not be rewritten: {e}",
                warning.unwrap_or_default()
            ));
        }
        (mgr, warning)
    }

    /// The current or last deploy.
    pub fn current(&self) -> Option<DeployInfo> {
        self.read().clone()
    }

    /// Whether a deploy is running now.
    pub fn is_running(&self) -> bool {
        self.read()
            .as_ref()
            .is_some_and(|d| d.state == DeployState::Running)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Option<DeployInfo>> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Option<DeployInfo>> {
        self.current.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new running deploy of `tag`, unless one is running: then `Err` with it. The
    /// new deploy is in the state file before anyone can see it.
    pub async fn try_start(self: &Arc<Self>, tag: &str) -> Result<DeployInfo, DeployInfo> {
        let _guard = self.persist_lock.lock().await;
        if let Some(d) = self.read().as_ref()
            && d.state == DeployState::Running
        {
            return Err(d.clone());
        }
        let now = Timestamp::now();
        let info = DeployInfo {
            id: self.new_id(now),
            tag: tag.to_string(),
            previous_tag: None,
            state: DeployState::Running,
            step: DeployStep::RecordPrevious,
            message: format!("deploy of {tag} started"),
            started_at: now,
            finished_at: None,
            steps: Vec::new(),
        };
        self.store(info.clone()).await;
        Ok(info)
    }

    fn new_id(&self, now: Timestamp) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let seed = format!("{}-{}-{n}", now.as_nanosecond(), std::process::id());
        let h = hex::encode(Sha256::digest(seed.as_bytes()));
        format!("{}-{}", now.strftime("%Y%m%dT%H%M%SZ"), &h[..8])
    }

    /// Applies `f` to deploy `id`: the changed record goes to the state file first, then to
    /// memory, so whatever `/health` has shown survives a crash. Changes are serialised.
    async fn update(self: &Arc<Self>, id: &str, f: impl FnOnce(&mut DeployInfo)) {
        let _guard = self.persist_lock.lock().await;
        let Some(mut next) = self.current().filter(|d| d.id == id) else {
            return;
        };
        f(&mut next);
        self.store(next).await;
    }

    /// `outcome` with its message masked.
    fn mask(&self, outcome: Outcome) -> Outcome {
        let r = &self.redactor;
        match outcome {
            Outcome::Ok(m) => Outcome::Ok(r.redact(&m)),
            Outcome::Warn(m) => Outcome::Warn(r.redact(&m)),
            Outcome::Skipped(m) => Outcome::Skipped(r.redact(&m)),
            Outcome::Failed(m) => Outcome::Failed(r.redact(&m)),
        }
    }

    /// Writes `info` to the state file, then publishes it. Call with `persist_lock` held. Every
    /// message is masked first (the last layer: what a step said has been masked already).
    async fn store(self: &Arc<Self>, mut info: DeployInfo) {
        let r = self.redactor.current();
        if !r.is_empty() {
            info.message = r.redact(&info.message);
            for s in &mut info.steps {
                s.message = r.redact(&s.message);
            }
        }
        let path = self.state_file.clone();
        let copy = info.clone();
        let res = tokio::task::spawn_blocking(move || write_state(&path, Some(&copy))).await;
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                state_file = %self.state_file.display(),
                error = %e,
                "cannot write the deploy state file; the deploy goes on"
            ),
            Err(e) => tracing::warn!(error = %e, "state file writer panicked"),
        }
        *self.write() = Some(info);
    }

    async fn begin_step(self: &Arc<Self>, id: &str, step: DeployStep) {
        self.update(id, |d| {
            d.step = step;
            d.steps.push(StepRecord {
                name: step,
                status: StepStatus::Running,
                message: String::new(),
                started_at: Timestamp::now(),
                finished_at: None,
            });
        })
        .await;
    }

    async fn finish_step(self: &Arc<Self>, id: &str, outcome: &Outcome, previous: Option<String>) {
        self.update(id, |d| {
            if previous.is_some() {
                d.previous_tag = previous;
            }
            if let Some(s) = d.steps.last_mut() {
                s.status = outcome.status();
                s.message = outcome.message().to_string();
                s.finished_at = Some(Timestamp::now());
            }
        })
        .await;
    }

    async fn finish(self: &Arc<Self>, id: &str, state: DeployState, message: String) {
        self.update(id, |d| {
            d.state = state;
            d.message = message;
            d.finished_at = Some(Timestamp::now());
        })
        .await;
    }

    /// Marks deploy `id` failed if it is still running (its task ended without finishing it).
    pub async fn abandon(self: &Arc<Self>, id: &str, message: String) {
        self.update(id, |d| {
            if d.state == DeployState::Running {
                d.state = DeployState::Failed;
                d.message = message;
                d.finished_at = Some(Timestamp::now());
            }
        })
        .await;
    }

    fn write_state_file(&self) -> std::io::Result<()> {
        write_state(&self.state_file, self.current().as_ref())
    }
}

fn write_state(path: &Path, deploy: Option<&DeployInfo>) -> std::io::Result<()> {
    let state = StateFile {
        version: 1,
        deploy: deploy.cloned(),
    };
    let json = serde_json::to_vec_pretty(&state).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    envfile::write_atomic(path, &json, 0o600)
}

/// Runs the deploy `id` (registered by [`DeployManager::try_start`]) to its end.
pub async fn run_deploy<O: DeployOps>(mgr: Arc<DeployManager>, ops: Arc<O>, id: String) {
    let Some(tag) = mgr.current().filter(|d| d.id == id).map(|d| d.tag) else {
        return;
    };
    let mut previous: Option<String> = None;
    let mut step = DeployStep::RecordPrevious;
    let mut touched = false;
    let mut first_failure: Option<(DeployStep, String)> = None;
    let mut last_failure: Option<(DeployStep, String)> = None;
    loop {
        mgr.begin_step(&id, step).await;
        tracing::info!(deploy = %id, %step, "deploy step started");
        let outcome = if step == DeployStep::RecordPrevious {
            match ops.read_tag().await {
                Ok(p) => {
                    let msg = match &p {
                        Some(t) => format!("previous tag {t}"),
                        None => "the env file names no tag yet".to_string(),
                    };
                    previous = p;
                    Outcome::Ok(msg)
                }
                Err(e) => Outcome::Failed(e),
            }
        } else {
            ops.run_step(step, &tag, previous.as_deref()).await
        };
        let outcome = mgr.mask(outcome);
        if matches!(step, DeployStep::StopWorker | DeployStep::Up) {
            touched = true;
        }
        let recorded_previous = (step == DeployStep::RecordPrevious)
            .then(|| previous.clone())
            .flatten();
        mgr.finish_step(&id, &outcome, recorded_previous).await;
        tracing::info!(
            deploy = %id,
            %step,
            status = ?outcome.status(),
            detail = outcome.message(),
            "deploy step finished"
        );
        if outcome.is_failure() {
            let f = (step, outcome.message().to_string());
            if first_failure.is_none() {
                first_failure = Some(f.clone());
            }
            last_failure = Some(f);
        }
        match next_step(step, !outcome.is_failure(), touched) {
            Next::Run(s) => step = s,
            Next::Finish(state) => {
                let prev = previous.as_deref().unwrap_or("(no tag)");
                let message = final_message(
                    state,
                    &tag,
                    prev,
                    touched,
                    first_failure.as_ref(),
                    last_failure.as_ref(),
                );
                tracing::info!(deploy = %id, state = state.as_str(), detail = %message, "deploy finished");
                mgr.finish(&id, state, message).await;
                return;
            }
        }
    }
}

/// After a restart of the agent: a deploy it cut short before any container was touched had
/// changed only the env file. The previous tag goes back there, so the file names what runs and
/// a later `up` (or a reboot) does not start the new tag unchecked; the message says so.
pub async fn recover_interrupted(mgr: &Arc<DeployManager>, ops: &CommandOps) {
    use DeployStep::*;
    let Some(d) = mgr.current() else {
        return;
    };
    let recorded = d
        .steps
        .iter()
        .any(|s| s.name == RecordPrevious && s.status == StepStatus::Succeeded);
    let touched = d
        .steps
        .iter()
        .any(|s| !matches!(s.name, RecordPrevious | SetImageTag | Login | Pull | Drain));
    if d.state != DeployState::Failed || !d.message.starts_with(INTERRUPTED) || !recorded || touched
    {
        return;
    }
    match ops.read_tag().await {
        Ok(Some(t)) if t == d.tag && d.previous_tag.as_deref() != Some(t.as_str()) => {}
        _ => return,
    }
    let prev = d.previous_tag.clone();
    let outcome = ops.write_tag(prev.as_deref()).await;
    let step = d.step;
    let message = match &outcome {
        Outcome::Failed(e) => format!(
            "{INTERRUPTED} at step {step}; the containers were not touched, but the env file still names {} ({e})",
            d.tag
        ),
        _ => format!(
            "{INTERRUPTED} at step {step}; the containers were not touched: env file restored to {}",
            prev.as_deref().unwrap_or("(no tag)")
        ),
    };
    tracing::warn!(deploy = %d.id, "{message}");
    mgr.update(&d.id, |d| d.message = message).await;
}

/// How the message of a deploy cut short by a restart of the agent begins.
const INTERRUPTED: &str = "agent restarted during deploy";

fn replaced_note(done: &[String]) -> String {
    if done.is_empty() {
        String::new()
    } else {
        format!(" (already replaced: {})", done.join(", "))
    }
}

fn final_message(
    state: DeployState,
    tag: &str,
    prev: &str,
    touched: bool,
    first: Option<&(DeployStep, String)>,
    last: Option<&(DeployStep, String)>,
) -> String {
    let failed_at = |f: Option<&(DeployStep, String)>| {
        f.map(|(s, m)| format!("failed at {s}: {m}"))
            .unwrap_or_else(|| "failed".into())
    };
    match state {
        DeployState::Succeeded => format!("deployed {tag} (previous {prev})"),
        DeployState::RolledBack if touched => format!(
            "deploy of {tag} {}; rolled back to {prev}, healthy",
            failed_at(first)
        ),
        DeployState::RolledBack => format!(
            "deploy of {tag} {}; env file restored to {prev}, containers untouched",
            failed_at(first)
        ),
        _ => {
            let mut m = format!("deploy of {tag} {}", failed_at(first));
            if let (Some(f), Some(l)) = (first, last)
                && f.0 != l.0
            {
                m.push_str(&format!("; rollback {}", failed_at(Some(l))));
            }
            m
        }
    }
}

/// The production edges: the deploy env file, the docker CLI, the worker's HTTP endpoints.
pub struct CommandOps {
    /// The agent's configuration.
    pub cfg: Arc<AgentConfig>,
    /// For the worker's status, drain and health endpoints.
    pub http: reqwest::Client,
    /// Masks secrets in command output and messages.
    pub redactor: Redactor,
    /// Held while an env file is read, edited and written (shared with `PUT /env`).
    pub env_lock: Arc<tokio::sync::Mutex<()>>,
    /// What the running deploy remembers between its steps.
    pub memory: DeployMemory,
}

/// What a deploy remembers between its steps (one deploy runs at a time).
#[derive(Debug, Default)]
pub struct DeployMemory {
    /// The targeted workers as they ran before `up` replaced them (for the rollback).
    targeted: std::sync::Mutex<Option<Vec<WorkerSpec>>>,
}

impl DeployMemory {
    fn forget(&self) {
        *self.targeted.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
    fn set_targeted(&self, specs: Vec<WorkerSpec>) {
        *self.targeted.lock().unwrap_or_else(|e| e.into_inner()) = Some(specs);
    }
    fn targeted(&self) -> Option<Vec<WorkerSpec>> {
        self.targeted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl CommandOps {
    fn engine(&self) -> Engine<'_> {
        Engine {
            cfg: &self.cfg,
            redactor: &self.redactor,
        }
    }

    /// `up`, then the targeted workers: each drained, replaced by a container of the new tag
    /// (see [`Engine::replace_worker`]) and checked. What they ran before is remembered for the
    /// rollback.
    async fn up_and_targeted(&self, tag: &str) -> Outcome {
        let timeout = self.cfg.deploy.command_timeout.0;
        let up = self
            .docker(&["up", "-d", "--remove-orphans"], timeout)
            .await;
        if up.is_failure() {
            return up;
        }
        let engine = self.engine();
        let specs = match engine.targeted_specs().await {
            Ok(s) => s,
            Err(e) => return Outcome::Failed(format!("{}; but {e}", up.message())),
        };
        self.memory.set_targeted(specs.clone());
        if specs.is_empty() {
            return up;
        }
        let start = Instant::now();
        let not_drained = engine.drain_targeted(&self.http, &specs).await;
        let mut done = Vec::new();
        for spec in &specs {
            if let Err(e) = engine
                .replace_worker(&self.http, spec, &spec.image(tag))
                .await
            {
                return Outcome::Failed(format!(
                    "{}; targeted worker {e}{}",
                    up.message(),
                    replaced_note(&done)
                ));
            }
            done.push(spec.name.clone());
        }
        let drained = if not_drained.is_empty() {
            String::new()
        } else {
            format!(
                " (stopped with the {} grace though not drained: {})",
                self.cfg.deploy.stop_grace,
                not_drained.join(", ")
            )
        };
        Outcome::Ok(format!(
            "{}; targeted workers {} recreated on {tag} in {}{drained}",
            up.message(),
            done.join(", "),
            containers::secs(start)
        ))
    }

    /// The rollback's `up`, then the targeted workers back on the image each ran before (those
    /// that already run it are left alone).
    async fn rollback_up_and_targeted(&self) -> Outcome {
        let timeout = self.cfg.deploy.command_timeout.0;
        let up = self
            .docker(&["up", "-d", "--remove-orphans"], timeout)
            .await;
        let specs = self.memory.targeted().unwrap_or_default();
        let engine = self.engine();
        let mut restored = Vec::new();
        let mut failed = Vec::new();
        for spec in &specs {
            let Some(tag) = spec.tag.as_deref() else {
                failed.push(format!("{}: its previous tag is unknown", spec.name));
                continue;
            };
            let image = spec.image(tag);
            if engine.container_image(&spec.name).await == Some((image.clone(), true)) {
                continue;
            }
            match engine.replace_worker(&self.http, spec, &image).await {
                Ok(()) => restored.push(spec.name.clone()),
                Err(e) => failed.push(e),
            }
        }
        let mut msg = up.message().to_string();
        if !restored.is_empty() {
            msg.push_str(&format!(
                "; targeted workers {} back on their previous image",
                restored.join(", ")
            ));
        }
        if !failed.is_empty() {
            msg.push_str(&format!(
                "; targeted workers not restored: {}",
                failed.join("; ")
            ));
            return Outcome::Failed(msg);
        }
        if up.is_failure() {
            Outcome::Failed(msg)
        } else {
            Outcome::Ok(msg)
        }
    }

    async fn docker(&self, sub: &[&str], timeout: Duration) -> Outcome {
        let args = compose_args(&self.cfg, sub);
        let what = format!("docker compose {}", sub.join(" "));
        match exec::run(&self.cfg.docker.binary, &args, timeout).await {
            Ok(out) if out.success() => Outcome::Ok(format!("{what}: ok")),
            Ok(out) => Outcome::Failed(format!("{what}: {}", out.describe(&self.redactor))),
            Err(e) => Outcome::Failed(self.redactor.redact(&e.to_string())),
        }
    }

    /// Sets (`Some`) or removes (`None`) the tag in the deploy env file, keeping its mode.
    async fn write_tag(&self, tag: Option<&str>) -> Outcome {
        let _g = self.env_lock.lock().await;
        let path = self.cfg.deploy_env_file().to_path_buf();
        let key = self.cfg.deploy.image_tag_key.clone();
        let tag = tag.map(str::to_string);
        let res = tokio::task::spawn_blocking(move || -> Result<String, String> {
            let (text, mode) = match std::fs::read(&path) {
                Ok(b) => {
                    let mode = std::fs::metadata(&path)
                        .map(|m| m.permissions().mode() & 0o7777)
                        .unwrap_or(0o600);
                    let text = String::from_utf8(b)
                        .map_err(|_| format!("{} is not valid UTF-8", path.display()))?;
                    (text, mode)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), 0o600),
                Err(e) => return Err(format!("reading {}: {e}", path.display())),
            };
            let edited = match &tag {
                Some(t) => envfile::set_var(&text, &key, t),
                None => envfile::remove_var(&text, &key),
            }
            .map_err(|e| format!("{} is not a valid env file: {e}", path.display()))?;
            envfile::write_atomic(&path, edited.as_bytes(), mode)
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
            Ok(match &tag {
                Some(t) => format!("{key}={t} written to {}", path.display()),
                None => format!("{key} removed from {}", path.display()),
            })
        })
        .await;
        match res {
            Ok(Ok(m)) => Outcome::Ok(m),
            Ok(Err(m)) => Outcome::Failed(m),
            Err(e) => Outcome::Failed(format!("env file writer panicked: {e}")),
        }
    }

    async fn drain(&self) -> Outcome {
        let d = &self.cfg.deploy;
        let start = Instant::now();
        let t = self.cfg.probe_timeout.0;
        let asked = worker::request_drain(&self.http, &self.cfg.worker.drain_url, t).await;
        if let Err(e) = &asked
            && e.unreachable
            && let Err(s) = worker::fetch_status(&self.http, &self.cfg.worker.status_url, t).await
            && s.unreachable
        {
            // Nothing listens on either endpoint: the worker is not running, nothing to drain.
            return Outcome::Warn(format!(
                "worker not running (drain: {e}; status: {s}); nothing to drain"
            ));
        }
        let (safe, last) = wait_deploy_safe(
            &self.http,
            &self.cfg.worker.status_url,
            d.drain_timeout.0,
            d.drain_poll_interval.0,
            t,
        )
        .await;
        let waited = start.elapsed().as_secs_f64();
        let grace = d.stop_grace.0.as_secs();
        match (asked, safe, last) {
            (Ok(()), true, _) => Outcome::Ok(format!("worker deploy-safe after {waited:.1}s")),
            (Err(e), true, _) => Outcome::Warn(format!(
                "drain request failed ({e}) but the worker is deploy-safe"
            )),
            (asked, false, last) => {
                let asked = match asked {
                    Ok(()) => String::new(),
                    Err(e) => format!("drain request failed ({e}); "),
                };
                let state = match last {
                    Ok(s) => format!(
                        "{} active",
                        s.active_workers
                            .map(|n| n.to_string())
                            .unwrap_or_else(|| "unknown".into())
                    ),
                    Err(e) => format!("status unknown: {e}"),
                };
                match d.on_drain_timeout {
                    DrainTimeoutAction::Proceed => Outcome::Warn(format!(
                        "{asked}worker not deploy-safe after {waited:.0}s ({state}); stopping it with a {grace}s grace"
                    )),
                    DrainTimeoutAction::Abort => Outcome::Failed(format!(
                        "{asked}worker not deploy-safe after {waited:.0}s ({state}); not stopping it (onDrainTimeout: abort)"
                    )),
                }
            }
        }
    }

    async fn health(&self) -> Outcome {
        let d = &self.cfg.deploy;
        let mut last = String::new();
        for attempt in 1..=d.health_check_tries {
            match worker::check_health(
                &self.http,
                &self.cfg.worker.health_url,
                d.health_check_timeout.0,
            )
            .await
            {
                Ok(()) => {
                    return Outcome::Ok(format!(
                        "healthy at try {attempt} of {}",
                        d.health_check_tries
                    ));
                }
                Err(e) => last = e,
            }
            if attempt < d.health_check_tries {
                tokio::time::sleep(d.health_check_interval.0).await;
            }
        }
        Outcome::Failed(format!(
            "not healthy after {} tries {} apart (last: {last})",
            d.health_check_tries, d.health_check_interval
        ))
    }
}

/// Polls the worker's status until it is deploy-safe or `timeout` passes. Returns whether it
/// became safe and the last answer.
pub async fn wait_deploy_safe(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
    poll: Duration,
    request_timeout: Duration,
) -> (bool, Result<worker::WorkerStatus, String>) {
    let deadline = Instant::now() + timeout;
    loop {
        let last = worker::fetch_status(http, url, request_timeout)
            .await
            .map_err(|e| e.to_string());
        if last.as_ref().is_ok_and(|s| s.deploy_safe) {
            return (true, last);
        }
        let now = Instant::now();
        if now >= deadline {
            return (false, last);
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
    }
}

impl DeployOps for CommandOps {
    async fn read_tag(&self) -> Result<Option<String>, String> {
        // A new deploy starts here: nothing remembered from the last one applies.
        self.memory.forget();
        let path = self.cfg.deploy_env_file();
        match tokio::fs::read(path).await {
            Ok(b) => envfile::parse_bytes(&b)
                .map(|f| f.get(&self.cfg.deploy.image_tag_key).map(str::to_string))
                .map_err(|e| format!("{} is not a valid env file: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    }

    async fn run_step(&self, step: DeployStep, tag: &str, previous: Option<&str>) -> Outcome {
        let d = &self.cfg.deploy;
        let cmd_timeout = d.command_timeout.0;
        match step {
            DeployStep::SetImageTag => self.write_tag(Some(tag)).await,
            DeployStep::RollbackImageTag => self.write_tag(previous).await,
            DeployStep::Login => match self.engine().login().await {
                Ok(None) => Outcome::Skipped("no login command configured".into()),
                Ok(Some(m)) => Outcome::Ok(m),
                Err(e) => Outcome::Failed(e),
            },
            DeployStep::Pull => self.docker(&["pull"], cmd_timeout).await,
            DeployStep::Drain => self.drain().await,
            DeployStep::StopWorker => {
                let grace = d.stop_grace.0.as_secs().to_string();
                let svc = self.cfg.docker.worker_service.clone();
                self.docker(&["stop", "-t", &grace, &svc], d.stop_grace.0 + cmd_timeout)
                    .await
            }
            DeployStep::Up => self.up_and_targeted(tag).await,
            DeployStep::RollbackUp => self.rollback_up_and_targeted().await,
            DeployStep::HealthCheck | DeployStep::RollbackHealthCheck => self.health().await,
            DeployStep::RecordPrevious | DeployStep::Unknown => {
                Outcome::Failed(format!("step {step} is not run by run_step"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn transitions() {
        use DeployState as S;
        use DeployStep::*;
        let happy = [
            RecordPrevious,
            SetImageTag,
            Login,
            Pull,
            Drain,
            StopWorker,
            Up,
            HealthCheck,
        ];
        for w in happy.windows(2) {
            assert_eq!(next_step(w[0], true, false), Next::Run(w[1]));
        }
        assert_eq!(
            next_step(HealthCheck, true, true),
            Next::Finish(S::Succeeded)
        );
        assert_eq!(
            next_step(RecordPrevious, false, false),
            Next::Finish(S::Failed)
        );
        assert_eq!(
            next_step(SetImageTag, false, false),
            Next::Finish(S::Failed)
        );
        for s in [Login, Pull, Drain, StopWorker, Up, HealthCheck] {
            assert_eq!(next_step(s, false, true), Next::Run(RollbackImageTag));
        }
        assert_eq!(
            next_step(RollbackImageTag, true, false),
            Next::Finish(S::RolledBack)
        );
        assert_eq!(
            next_step(RollbackImageTag, true, true),
            Next::Run(RollbackUp)
        );
        assert_eq!(
            next_step(RollbackUp, true, true),
            Next::Run(RollbackHealthCheck)
        );
        assert_eq!(
            next_step(RollbackHealthCheck, true, true),
            Next::Finish(S::RolledBack)
        );
        for s in [RollbackImageTag, RollbackUp, RollbackHealthCheck] {
            assert_eq!(next_step(s, false, true), Next::Finish(S::Failed));
        }
    }

    /// Fails the listed steps; records what ran and the tag the "env file" holds.
    struct MockOps {
        fail: Vec<DeployStep>,
        tag: Mutex<Option<String>>,
        ran: Mutex<Vec<DeployStep>>,
    }

    impl MockOps {
        fn new(prev: Option<&str>, fail: &[DeployStep]) -> Arc<Self> {
            Arc::new(Self {
                fail: fail.to_vec(),
                tag: Mutex::new(prev.map(str::to_string)),
                ran: Mutex::new(Vec::new()),
            })
        }
    }

    impl DeployOps for MockOps {
        async fn read_tag(&self) -> Result<Option<String>, String> {
            self.ran.lock().unwrap().push(DeployStep::RecordPrevious);
            if self.fail.contains(&DeployStep::RecordPrevious) {
                return Err("unreadable".into());
            }
            Ok(self.tag.lock().unwrap().clone())
        }
        async fn run_step(&self, step: DeployStep, tag: &str, prev: Option<&str>) -> Outcome {
            self.ran.lock().unwrap().push(step);
            if self.fail.contains(&step) {
                return Outcome::Failed(format!("{step} broke"));
            }
            match step {
                DeployStep::SetImageTag => *self.tag.lock().unwrap() = Some(tag.into()),
                DeployStep::RollbackImageTag => {
                    *self.tag.lock().unwrap() = prev.map(str::to_string)
                }
                _ => {}
            }
            Outcome::Ok("ok".into())
        }
    }

    async fn deploy(prev: Option<&str>, fail: &[DeployStep]) -> (DeployInfo, Arc<MockOps>) {
        let dir = tempfile::tempdir().unwrap();
        let (mgr, _) = DeployManager::load(&dir.path().join("state.json"));
        let mgr = Arc::new(mgr);
        let info = mgr.try_start("v2").await.unwrap();
        assert_eq!(mgr.try_start("v3").await.unwrap_err().id, info.id);
        let ops = MockOps::new(prev, fail);
        run_deploy(mgr.clone(), ops.clone(), info.id).await;
        let done = mgr.current().unwrap();
        // The file says the same as memory.
        let (again, warning) = DeployManager::load(&dir.path().join("state.json"));
        assert!(warning.is_none());
        assert_eq!(again.current().unwrap(), done);
        (done, ops)
    }

    #[tokio::test]
    async fn success_runs_every_step_in_order() {
        use DeployStep::*;
        let (d, ops) = deploy(Some("v1"), &[]).await;
        assert_eq!(d.state, DeployState::Succeeded);
        assert_eq!(d.previous_tag.as_deref(), Some("v1"));
        assert_eq!(
            *ops.ran.lock().unwrap(),
            vec![
                RecordPrevious,
                SetImageTag,
                Login,
                Pull,
                Drain,
                StopWorker,
                Up,
                HealthCheck
            ]
        );
        assert_eq!(ops.tag.lock().unwrap().as_deref(), Some("v2"));
        assert!(d.steps.iter().all(|s| s.status == StepStatus::Succeeded));
        assert!(d.finished_at.is_some());
    }

    #[tokio::test]
    async fn failed_health_check_rolls_back() {
        use DeployStep::*;
        let (d, ops) = deploy(Some("v1"), &[HealthCheck]).await;
        assert_eq!(d.state, DeployState::RolledBack);
        assert_eq!(ops.tag.lock().unwrap().as_deref(), Some("v1"));
        assert_eq!(
            ops.ran.lock().unwrap()[7..],
            [
                HealthCheck,
                RollbackImageTag,
                RollbackUp,
                RollbackHealthCheck
            ]
        );
        assert!(
            d.message.contains("failed at health_check"),
            "{}",
            d.message
        );
        assert_eq!(d.step, RollbackHealthCheck);
    }

    #[tokio::test]
    async fn failed_pull_restores_the_tag_without_touching_containers() {
        use DeployStep::*;
        let (d, ops) = deploy(None, &[Pull]).await;
        assert_eq!(d.state, DeployState::RolledBack);
        assert_eq!(*ops.tag.lock().unwrap(), None);
        assert_eq!(ops.ran.lock().unwrap().last(), Some(&RollbackImageTag));
        assert!(d.message.contains("containers untouched"), "{}", d.message);
    }

    #[tokio::test]
    async fn failed_rollback_is_failed() {
        use DeployStep::*;
        let (d, _) = deploy(Some("v1"), &[Up, RollbackUp]).await;
        assert_eq!(d.state, DeployState::Failed);
        assert!(d.message.contains("failed at up"), "{}", d.message);
        assert!(
            d.message.contains("rollback failed at rollback_up"),
            "{}",
            d.message
        );
        let (d, _) = deploy(Some("v1"), &[RecordPrevious]).await;
        assert_eq!(d.state, DeployState::Failed);
        assert_eq!(d.steps.len(), 1);
    }

    #[tokio::test]
    async fn restart_mid_deploy_is_reported_failed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (mgr, _) = DeployManager::load(&path);
        let mgr = Arc::new(mgr);
        let info = mgr.try_start("v9").await.unwrap();
        mgr.begin_step(&info.id, DeployStep::Pull).await;
        drop(mgr);
        let (mgr, warning) = DeployManager::load(&path);
        let d = mgr.current().unwrap();
        assert_eq!(d.state, DeployState::Failed);
        assert_eq!(
            d.message,
            "agent restarted during deploy at step pull; the instance may run either tag"
        );
        assert!(warning.unwrap().contains("step pull"));
        assert_eq!(d.steps.last().unwrap().status, StepStatus::Failed);
        // And the file was rewritten: a third start sees failed, not running.
        let (mgr, warning) = DeployManager::load(&path);
        assert!(warning.is_none());
        assert_eq!(mgr.current().unwrap().state, DeployState::Failed);
        assert!(Arc::new(mgr).try_start("v10").await.is_ok());
    }

    struct Panicky;

    impl DeployOps for Panicky {
        async fn read_tag(&self) -> Result<Option<String>, String> {
            panic!("a bug")
        }
        async fn run_step(&self, _: DeployStep, _: &str, _: Option<&str>) -> Outcome {
            unreachable!()
        }
    }

    #[tokio::test]
    async fn a_dead_deploy_task_is_marked_failed() {
        let dir = tempfile::tempdir().unwrap();
        let (mgr, _) = DeployManager::load(&dir.path().join("state.json"));
        let mgr = Arc::new(mgr);
        let info = mgr.try_start("v2").await.unwrap();
        let task = tokio::spawn(run_deploy(mgr.clone(), Arc::new(Panicky), info.id.clone()));
        assert!(task.await.is_err());
        mgr.abandon(&info.id, "task died".into()).await;
        let d = mgr.current().unwrap();
        assert_eq!(
            (d.state, d.message.as_str()),
            (DeployState::Failed, "task died")
        );
        // A finished deploy is left alone.
        mgr.abandon(&info.id, "again".into()).await;
        assert_eq!(mgr.current().unwrap().message, "task died");
    }

    #[test]
    fn corrupt_state_file_is_survived() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{not json").unwrap();
        let (mgr, warning) = DeployManager::load(&path);
        assert!(mgr.current().is_none());
        assert!(warning.unwrap().contains("not valid"));
    }
}
