//! The agent's HTTP server: routes, bearer-token auth, body limits, timeouts, the background
//! refresher that keeps `/health` a read of a snapshot, and the deploy task.
//!
//! | route           | auth                                 | body limit        | timeout |
//! |-----------------|--------------------------------------|-------------------|---------|
//! | `GET /health`   | only with `requireAuthForHealth`     | --                | request |
//! | `GET /healthz`  | never (liveness of the agent itself) | --                | request |
//! | `POST /deploy`  | bearer                               | `bodyBytes`       | request |
//! | `POST /drain`   | bearer                               | `bodyBytes`       | request + drain |
//! | `POST /restart` | bearer                               | `bodyBytes`       | request + restart |
//! | `PUT /env`      | bearer                               | `envBodyBytes`    | request + restart x services |
//!
//! `PUT /env` takes JSON: `{"content": "<the whole env file>", "restartServices": ["..."]}`.
//!
//! Nothing here logs a request body, a header, the token or an env value; command output that
//! reaches a log line or a response goes through the [`Redactor`] first.

use crate::agent::daemon::checks::{Collector, EnvHash, Snapshot};
use crate::agent::daemon::config::{AgentConfig, ServiceAction, is_valid_service_name};
use crate::agent::daemon::containers::EngineView;
use crate::agent::daemon::deploy::{self, CommandOps, DeployManager};
use crate::agent::daemon::exec::Redactor;
use crate::agent::daemon::services;
use crate::agent::daemon::worker;
use crate::agent::envfile;
use crate::agent::protocol::{
    self, CheckStatus, DeployAccepted, DeployRequest, DeployState, DrainRequest, DrainResponse,
    ErrorBody, HealthReport, PutEnvRequest, PutEnvResponse, RestartRequest, RestartResponse,
};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use futures::StreamExt;
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tower_http::timeout::TimeoutLayer;

/// The agent's version, reported in `/health`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The token file could not be read, or holds no token.
    #[error("reading token file {path}: {message}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// The address file (`--addr-file`) could not be written.
    #[error("writing address file {path}: {source}")]
    AddrFile {
        /// The file.
        path: PathBuf,
        /// Why writing failed.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("serving HTTP: {0}")]
    Serve(std::io::Error),
}

/// Reads the token: the file's first line, trimmed. Warns (without the token) when the file can
/// be read by others.
pub fn load_token(path: &Path) -> Result<String, ServerError> {
    let err = |message: String| ServerError::Token {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < 16 {
        return Err(err(
            "the token must be at least 16 characters (e.g. `openssl rand -hex 32`)".into(),
        ));
    }
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            token_file = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "token file is readable by group or others; chmod 600 it"
        );
    }
    Ok(token)
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    cfg: Arc<AgentConfig>,
    /// sha256 of the token (compared in constant time with the sha256 of the presented one).
    token_digest: Arc<RwLock<[u8; 32]>>,
    snapshot: Arc<RwLock<Arc<Snapshot>>>,
    deploys: Arc<DeployManager>,
    ops: Arc<CommandOps>,
    redactor: Redactor,
    http: reqwest::Client,
    env_lock: Arc<tokio::sync::Mutex<()>>,
    env_hash: EnvHash,
    /// What the engine showed at the last look (the worker's image, the targeted workers).
    engine_view: Arc<RwLock<EngineView>>,
    /// When the worker was last asked to drain (`POST /drain`); a deploy, which replaces the
    /// worker, ends it. Reported in `/health` as `drainingSince`.
    draining_since: Arc<RwLock<Option<Timestamp>>>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl AppState {
    /// Sets up the state: loads the deploy state file (recovering an interrupted deploy) and
    /// takes the first snapshot.
    pub async fn new(cfg: AgentConfig, token: &str) -> (Self, Collector) {
        let cfg = Arc::new(cfg);
        let redactor = Redactor::default();
        redactor.set_values("token", [token]);
        let (deploys, warning) = DeployManager::load_with(&cfg.state_file, redactor.clone());
        let deploys = Arc::new(deploys);
        if let Some(w) = warning {
            tracing::warn!(state_file = %cfg.state_file.display(), "{w}");
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap_or_default();
        let env_lock = Arc::new(tokio::sync::Mutex::new(()));
        let ops = Arc::new(CommandOps {
            cfg: cfg.clone(),
            http: http.clone(),
            redactor: redactor.clone(),
            env_lock: env_lock.clone(),
            memory: Default::default(),
        });
        deploy::recover_interrupted(&deploys, &ops).await;
        let env_hash = EnvHash::default();
        let mut collector = Collector::new(
            cfg.clone(),
            redactor.clone(),
            env_lock.clone(),
            env_hash.clone(),
        );
        let first = collector.collect().await;
        let state = Self {
            cfg,
            token_digest: Arc::new(RwLock::new(digest(token))),
            snapshot: Arc::new(RwLock::new(Arc::new(first))),
            deploys,
            engine_view: Arc::default(),
            draining_since: Arc::default(),
            ops,
            redactor,
            http,
            env_lock,
            env_hash,
        };
        (state, collector)
    }

    /// Replaces the token (SIGHUP).
    pub fn set_token(&self, token: &str) {
        self.redactor.set_values("token", [token]);
        *self.token_digest.write().unwrap_or_else(|e| e.into_inner()) = digest(token);
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn store_snapshot(&self, s: Snapshot) {
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(s);
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(presented) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
        else {
            return false;
        };
        let expected = *self.token_digest.read().unwrap_or_else(|e| e.into_inner());
        digest(presented).ct_eq(&expected).into()
    }

    /// The `/health` body: the last snapshot plus the live deploy state.
    pub fn report(&self) -> HealthReport {
        let snap = self.snapshot();
        let deploy = self.deploys.current();
        let view = self
            .engine_view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // The engine's word on the running image counts once it was looked at after the last
        // deploy ended.
        let seen_after_deploy = view.taken_at.is_some_and(|t| match &deploy {
            None => true,
            Some(d) => d.state != DeployState::Running && d.finished_at.is_some_and(|f| t > f),
        });
        let image_tag = match &deploy {
            Some(d) if d.state == DeployState::Running => {
                d.previous_tag.clone().or_else(|| snap.image_tag.clone())
            }
            _ if seen_after_deploy && view.running_tag.is_some() => view.running_tag.clone(),
            Some(d) if d.finished_at.is_some_and(|f| f > snap.taken_at) => match d.state {
                DeployState::Succeeded => Some(d.tag.clone()),
                DeployState::RolledBack => d.previous_tag.clone(),
                _ => snap.image_tag.clone(),
            },
            _ => snap.image_tag.clone(),
        };
        let failing = snap.checks.iter().any(|c| c.status == CheckStatus::Fail);
        let (active_workers, deploy_safe) = match &snap.worker {
            Ok(w) => (w.active_workers, Some(w.deploy_safe)),
            Err(_) => (None, None),
        };
        HealthReport {
            status: if failing { "degraded" } else { "ok" }.to_string(),
            cpu: snap.host.cpu,
            memory_total_mb: snap.host.memory_total_mb,
            memory_used_mb: snap.host.memory_used_mb,
            disk_total_gb: snap.host.disk_total_gb,
            disk_used_gb: snap.host.disk_used_gb,
            adspower_status: snap.adspower_status.clone(),
            active_profiles: snap.active_profiles,
            active_workers,
            uptime: snap.host.uptime_secs as f64,
            image_tag,
            deploy,
            env_sha256: self
                .env_hash
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            agent_version: Some(AGENT_VERSION.to_string()),
            deploy_safe,
            browser_engine: Some(self.cfg.browser_engine.as_str().to_string()),
            browser_status: Some(snap.browser_status.clone()),
            checked_at: Some(snap.taken_at),
            checks: snap.checks.clone(),
            targeted_workers: view.targeted,
            draining_since: *self
                .draining_since
                .read()
                .unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Looks at the engine every `docker.observeInterval`, forever.
    pub async fn observe_loop(self) {
        let mut tick = tokio::time::interval(self.cfg.docker.observe_interval.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let v = EngineView::observe(&self.cfg, &self.redactor).await;
            *self.engine_view.write().unwrap_or_else(|e| e.into_inner()) = v;
        }
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                success: false,
                message: message.into(),
                deploy_id: None,
                sha256: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// Reads a JSON body of at most `limit` bytes: 413 above (from `Content-Length` before reading
/// anything, or while reading), 400 when it is not the expected JSON. An empty body is `None`.
async fn read_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Option<T>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {limit} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large());
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "could not read the body"))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&buf).map(Some).map_err(|e| {
        // serde_json's message names the expected field or type and a position, not content.
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body: {}", classify_json_error(&e)),
        )
    })
}

fn classify_json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        // Data errors ("missing field `image_tag`", "invalid type: ...") can quote a value:
        // keep the part before any quoted content.
        Category::Data => {
            let m = e.to_string();
            if m.starts_with("missing field") || m.starts_with("unknown field") {
                m
            } else {
                format!("wrong type at line {} column {}", e.line(), e.column())
            }
        }
        Category::Syntax | Category::Eof => {
            format!("syntax error at line {} column {}", e.line(), e.column())
        }
        Category::Io => "read error".into(),
    }
}

/// Bearer auth for everything but `/healthz` and (unless configured) `GET /health`.
async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let open = path == protocol::PATH_LIVENESS
        || (path == protocol::PATH_HEALTH
            && (req.method() == Method::GET || req.method() == Method::HEAD)
            && !st.cfg.require_auth_for_health);
    if open || st.authorized(req.headers()) {
        return next.run(req).await;
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token (Authorization: Bearer <token>)",
    )
    .into_response()
}

/// One line per request: method, path (never the query), status, time. `/health` at debug.
async fn access_log(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    let status = resp.status().as_u16();
    if method == Method::GET && (path == protocol::PATH_HEALTH || path == protocol::PATH_LIVENESS) {
        tracing::debug!(%method, %path, status, us, "request");
    } else {
        tracing::info!(%method, %path, status, us, "request");
    }
    resp
}

async fn health(State(st): State<AppState>) -> Response {
    let mut r = axum::Json(st.report()).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn liveness() -> &'static str {
    "ok\n"
}

async fn start_deploy(State(st): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let Some(r): Option<DeployRequest> =
        read_json(&parts.headers, body, st.cfg.limits.body_bytes).await?
    else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "body must be {\"image_tag\": \"...\"}",
        ));
    };
    if !protocol::is_valid_image_tag(&r.image_tag) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "image_tag must be 1-128 characters of [A-Za-z0-9_.-], not starting with . or -",
        ));
    }
    match st.deploys.try_start(&r.image_tag).await {
        Ok(info) => {
            tracing::info!(deploy = %info.id, tag = %info.tag, "deploy accepted");
            // The deploy replaces the worker: the new one takes work again.
            *st.draining_since.write().unwrap_or_else(|e| e.into_inner()) = None;
            let task = tokio::spawn(deploy::run_deploy(
                st.deploys.clone(),
                st.ops.clone(),
                info.id.clone(),
            ));
            // Should the task ever die (a bug), the deploy must not read "running" forever.
            let (mgr, id) = (st.deploys.clone(), info.id.clone());
            tokio::spawn(async move {
                if let Err(e) = task.await {
                    tracing::error!(deploy = %id, error = %e, "deploy task died");
                    mgr.abandon(&id, format!("the agent's deploy task died: {e}"))
                        .await;
                }
            });
            let body = DeployAccepted {
                success: true,
                message: format!("Deploy of {} initiated", info.tag),
                deploy_id: Some(info.id),
            };
            Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
        }
        Err(running) => {
            let mut e = ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "deploy {} of {} is running (step {})",
                    running.id, running.tag, running.step
                ),
            );
            e.body.deploy_id = Some(running.id);
            Err(e)
        }
    }
}

async fn drain(State(st): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let r: DrainRequest = read_json(&parts.headers, body, st.cfg.limits.body_bytes)
        .await?
        .unwrap_or_default();
    let t = st.cfg.probe_timeout.0;
    let status_url = &st.cfg.worker.status_url;
    let asked = worker::request_drain(&st.http, &st.cfg.worker.drain_url, t).await;
    if asked.is_ok() {
        let mut since = st.draining_since.write().unwrap_or_else(|e| e.into_inner());
        if since.is_none() {
            *since = Some(Timestamp::now());
        }
        tracing::info!("drain: the worker was asked to stop taking new work");
    }
    if let Err(e) = asked {
        match worker::fetch_status(&st.http, status_url, t).await {
            // Nothing listens on either endpoint: no worker runs, nothing to drain.
            Err(s) if e.unreachable && s.unreachable => {
                tracing::info!("drain: the worker is not running; nothing to drain");
                return Ok(axum::Json(DrainResponse {
                    deploy_safe: true,
                    active_workers: None,
                })
                .into_response());
            }
            // The status answers: wait on it (an older worker may lack the drain endpoint).
            Ok(_) => tracing::warn!(error = %e, "drain request failed; waiting on the status"),
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("asking the worker to drain: {e}"),
                ));
            }
        }
    }
    let max = st.cfg.deploy.drain_timeout.0;
    let timeout = r
        .timeout_seconds
        .map(|s| Duration::from_secs(s).min(max))
        .unwrap_or(max);
    let last = if r.wait.unwrap_or(true) {
        deploy::wait_deploy_safe(
            &st.http,
            status_url,
            timeout,
            st.cfg.deploy.drain_poll_interval.0,
            t,
        )
        .await
        .1
    } else {
        worker::fetch_status(&st.http, status_url, t)
            .await
            .map_err(|e| e.to_string())
    };
    let s = last.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("worker drained, but its status is unknown: {e}"),
        )
    })?;
    Ok(axum::Json(DrainResponse {
        deploy_safe: s.deploy_safe,
        active_workers: s.active_workers,
    })
    .into_response())
}

/// Checks a service name against the allow-list: 400 malformed, 403 not allowed.
fn allowed_service<'a>(cfg: &'a AgentConfig, name: &str) -> Result<&'a ServiceAction, ApiError> {
    if !is_valid_service_name(name) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "service must be 1-64 characters of [A-Za-z0-9._@-]",
        ));
    }
    cfg.services.get(name).ok_or_else(|| {
        let allowed: Vec<&str> = cfg.services.keys().map(String::as_str).collect();
        ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "service {name} is not in the restart allow-list ({})",
                allowed.join(", ")
            ),
        )
    })
}

async fn restart_service(st: &AppState, name: &str, action: &ServiceAction) -> RestartResponse {
    // A deploy replaces the same containers: the two must not race.
    if (action.compose_service.is_some() || action.targeted_workers.is_some())
        && st.deploys.is_running()
    {
        return RestartResponse {
            success: false,
            service: name.into(),
            message: format!(
                "restarting {name}: a deploy is running and replaces the containers; retry when it has finished"
            ),
        };
    }
    services::restart(&st.cfg, &st.redactor, &st.http, name, action).await
}

async fn restart(State(st): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let Some(r): Option<RestartRequest> =
        read_json(&parts.headers, body, st.cfg.limits.body_bytes).await?
    else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "body must be {\"service\": \"...\"}",
        ));
    };
    let action = allowed_service(&st.cfg, &r.service)?.clone();
    let res = restart_service(&st, &r.service, &action).await;
    if res.success {
        Ok(axum::Json(res).into_response())
    } else {
        Err(ApiError::new(StatusCode::BAD_GATEWAY, res.message))
    }
}

async fn put_env(State(st): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let Some(r): Option<PutEnvRequest> =
        read_json(&parts.headers, body, st.cfg.limits.env_body_bytes).await?
    else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "body must be {\"content\": \"<env file>\", \"restartServices\": [...]}",
        ));
    };
    let mut actions = Vec::new();
    for name in &r.restart_services {
        actions.push((name.clone(), allowed_service(&st.cfg, name)?.clone()));
    }
    let parsed = envfile::parse(&r.content).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("content is not a valid env file: {e}"),
        )
    })?;
    let path = st.cfg.env_file.clone();
    if path == st.cfg.deploy_env_file() && st.deploys.is_running() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "a deploy is running and edits the same env file; retry when it has finished",
        ));
    }
    // Mask the new values before anything else can print them: a source of their own, which a
    // refresh that read the file just before this write cannot replace with the old values.
    st.redactor.set(
        "pushed-env",
        crate::agent::daemon::checks::env_secrets(
            r.content.as_bytes(),
            &[st.cfg.deploy.image_tag_key.as_str()],
        ),
    );
    let bytes = r.content.into_bytes();
    let sha = envfile::sha256_hex(&bytes);
    {
        let _g = st.env_lock.lock().await;
        let p = path.clone();
        tokio::task::spawn_blocking(move || envfile::write_atomic(&p, &bytes, 0o600))
            .await
            .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "writer panicked"))?
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("writing {}: {e}", path.display()),
                )
            })?;
        // /health reports the new hash at once.
        *st.env_hash.write().unwrap_or_else(|e| e.into_inner()) = Some(sha.clone());
    }
    tracing::info!(
        env_file = %path.display(),
        sha256 = %sha,
        keys = parsed.entries.len(),
        "env file written"
    );
    let mut restarted = Vec::new();
    for (name, action) in &actions {
        restarted.push(restart_service(&st, name, action).await);
    }
    let failed: Vec<&RestartResponse> = restarted.iter().filter(|r| !r.success).collect();
    if !failed.is_empty() {
        let msgs: Vec<&str> = failed.iter().map(|r| r.message.as_str()).collect();
        let mut e = ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("env file written (sha256 {sha}), but {}", msgs.join("; ")),
        );
        e.body.sha256 = Some(sha);
        return Err(e);
    }
    Ok(axum::Json(PutEnvResponse {
        sha256: sha,
        restarted,
    })
    .into_response())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

fn timeout(d: Duration) -> TimeoutLayer {
    TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, d)
}

/// The routes.
pub fn router(st: AppState) -> Router {
    let l = &st.cfg.limits;
    let base = l.request_timeout.0;
    let restart_t = l.restart_timeout.0;
    let env_t = base + restart_t * (st.cfg.services.len().max(1) as u32);
    Router::new()
        .route(protocol::PATH_HEALTH, get(health).layer(timeout(base)))
        .route(protocol::PATH_LIVENESS, get(liveness))
        .route(
            protocol::PATH_DEPLOY,
            post(start_deploy).layer(timeout(base)),
        )
        .route(
            protocol::PATH_DRAIN,
            post(drain).layer(timeout(base + st.cfg.deploy.drain_timeout.0)),
        )
        .route(
            protocol::PATH_RESTART,
            post(restart).layer(timeout(base + restart_t)),
        )
        .route(protocol::PATH_ENV, put(put_env).layer(timeout(env_t)))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(st.clone(), auth))
        .layer(middleware::from_fn(access_log))
        .with_state(st)
}

/// Refreshes the snapshot every `refreshInterval`, forever.
pub async fn refresh_loop(st: AppState, mut collector: Collector) {
    let mut tick = tokio::time::interval(st.cfg.refresh_interval.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let s = collector.collect().await;
        st.store_snapshot(s);
    }
}

/// Runs the agent until SIGTERM or SIGINT: binds, writes `addr_file`, serves, refreshes, reloads
/// the token on SIGHUP.
pub async fn run(cfg: AgentConfig, addr_file: Option<PathBuf>) -> Result<(), ServerError> {
    let token = load_token(&cfg.token_file)?;
    let token_file = cfg.token_file.clone();
    let listen = cfg.listen;
    let (st, collector) = AppState::new(cfg, &token).await;
    drop(token);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServerError::Serve)?;
    if let Some(p) = &addr_file {
        envfile::write_atomic(p, format!("{addr}\n").as_bytes(), 0o644).map_err(|source| {
            ServerError::AddrFile {
                path: p.clone(),
                source,
            }
        })?;
    }
    tracing::info!(%addr, version = AGENT_VERSION, "sandbox-agent listening");
    tokio::spawn(refresh_loop(st.clone(), collector));
    tokio::spawn(st.clone().observe_loop());
    let hup_state = st.clone();
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            match load_token(&token_file) {
                Ok(t) => {
                    hup_state.set_token(&t);
                    tracing::info!("token reloaded");
                }
                Err(e) => tracing::error!(error = %e, "token not reloaded; keeping the old one"),
            }
        }
    });
    let deploys = st.deploys.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(st))
        .with_graceful_shutdown(async {
            let _ = stop_rx.await;
        })
        .into_future();
    let mut server = std::pin::pin!(server);
    tokio::select! {
        r = &mut server => return r.map_err(ServerError::Serve),
        _ = shutdown_signal() => {}
    }
    if let Some(d) = deploys
        .current()
        .filter(|d| d.state == DeployState::Running)
    {
        tracing::warn!(
            deploy = %d.id,
            step = %d.step,
            "stopping during a deploy; it will be reported failed at the next start"
        );
    }
    let _ = stop_tx.send(());
    // In-flight requests get a little time (a /drain can wait for long).
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(r) => r.map_err(ServerError::Serve),
        Err(_) => Ok(()),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}
