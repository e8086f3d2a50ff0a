//! Virtual agents: one HTTP server in the bench process that answers for any number of
//! sandboxes' agents, at `http://127.0.0.1:PORT/v/{name}`, speaking the agent's protocol
//! (`GET /health`, `POST /deploy`, `POST /drain`; see [`sandbox_operator::agent::protocol`]).
//!
//! Each virtual agent reports a steady, idle host the way `sandbox-agent` does: metrics
//! sampled in the background every 5 s (so `uptime` is whole seconds as of the last sample),
//! CPU 4-6 %, memory and disk constant, no active workers, deploy-safe. A deploy finishes a
//! fixed time after `POST /deploy` and then reports the new tag; until then `imageTag` is the
//! old one and `deploy.state` is `running`, as on the real agent.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use jiff::Timestamp;

use sandbox_operator::agent::protocol::{
    DeployAccepted, DeployInfo, DeployRequest, DeployState, DeployStep, DrainResponse, ErrorBody,
    HealthReport,
};

/// How often a real agent refreshes its metrics in the background (its default).
const SAMPLE_EVERY_MS: i64 = 5_000;

struct Deploy {
    id: String,
    tag: String,
    previous: Option<String>,
    started_at: Timestamp,
    done_at: Instant,
    finished_at: Option<Timestamp>,
}

struct VAgent {
    tag: String,
    /// Host boot time, Unix milliseconds.
    boot_ms: i64,
    /// Offset of this agent's 5 s sampling clock, milliseconds.
    phase_ms: i64,
    deploy: Option<Deploy>,
}

struct Farm {
    agents: Mutex<HashMap<String, VAgent>>,
    initial_tag: String,
    token: Option<String>,
    deploy_time: Mutex<Duration>,
    seq: AtomicU64,
    health_requests: AtomicU64,
    deploy_requests: AtomicU64,
    drain_requests: AtomicU64,
}

/// Request counters of the farm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FarmCounts {
    /// `GET /health` answered.
    pub health: u64,
    /// `POST /deploy` received.
    pub deploy: u64,
    /// `POST /drain` received.
    pub drain: u64,
}

/// The virtual agent server; stops with the runtime that started it.
#[derive(Clone)]
pub struct AgentFarm {
    addr: SocketAddr,
    farm: Arc<Farm>,
}

fn hash_of(parts: impl Hash) -> u64 {
    // Fixed keys: the same name gives the same host in every run.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

impl AgentFarm {
    /// Starts the server on a free loopback port. Agents appear on first use, running
    /// `initial_tag`; mutating calls need `Bearer <token>` when a token is given.
    pub async fn start(initial_tag: &str, token: Option<String>) -> std::io::Result<Self> {
        let farm = Arc::new(Farm {
            agents: Mutex::new(HashMap::new()),
            initial_tag: initial_tag.to_owned(),
            token,
            deploy_time: Mutex::new(Duration::from_secs(10)),
            seq: AtomicU64::new(0),
            health_requests: AtomicU64::new(0),
            deploy_requests: AtomicU64::new(0),
            drain_requests: AtomicU64::new(0),
        });
        let router = axum::Router::new()
            .route("/v/{name}/health", get(health))
            .route("/v/{name}/deploy", post(deploy))
            .route("/v/{name}/drain", post(drain))
            .with_state(farm.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Self { addr, farm })
    }

    /// The agent URL of sandbox `name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/v/{name}", self.addr)
    }

    /// Sets how long a deploy takes from `POST /deploy` to reporting the new tag.
    pub fn set_deploy_time(&self, d: Duration) {
        *self.farm.deploy_time.lock().expect("farm") = d;
    }

    /// Requests answered so far.
    pub fn counts(&self) -> FarmCounts {
        FarmCounts {
            health: self.farm.health_requests.load(Ordering::Relaxed),
            deploy: self.farm.deploy_requests.load(Ordering::Relaxed),
            drain: self.farm.drain_requests.load(Ordering::Relaxed),
        }
    }
}

/// Finishes a deploy whose time has come.
fn settle(a: &mut VAgent) {
    if let Some(d) = a.deploy.as_mut()
        && d.finished_at.is_none()
        && Instant::now() >= d.done_at
    {
        d.finished_at = Some(Timestamp::now());
        a.tag = d.tag.clone();
    }
}

fn new_agent(farm: &Farm, name: &str) -> VAgent {
    let h = hash_of(name);
    let now_ms = Timestamp::now().as_millisecond();
    // Booted between one hour and ten days ago.
    let up_ms = 3_600_000 + (h % (9 * 86_400_000)) as i64;
    VAgent {
        tag: farm.initial_tag.clone(),
        boot_ms: now_ms - up_ms,
        phase_ms: ((h >> 32) % SAMPLE_EVERY_MS as u64) as i64,
        deploy: None,
    }
}

fn authorized(farm: &Farm, headers: &HeaderMap) -> bool {
    match &farm.token {
        None => true,
        Some(t) => headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|v| v == t),
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(ErrorBody {
            success: false,
            message: "missing or wrong bearer token".into(),
            deploy_id: None,
            sha256: None,
        }),
    )
        .into_response()
}

async fn health(State(farm): State<Arc<Farm>>, Path(name): Path<String>) -> Response {
    farm.health_requests.fetch_add(1, Ordering::Relaxed);
    let now_ms = Timestamp::now().as_millisecond();
    let mut agents = farm.agents.lock().expect("farm");
    let a = agents
        .entry(name.clone())
        .or_insert_with(|| new_agent(&farm, &name));
    settle(a);
    // The last background sample, as the real agent reports it.
    let sample_ms = now_ms - (now_ms - a.phase_ms).rem_euclid(SAMPLE_EVERY_MS);
    let sample_no = (sample_ms / SAMPLE_EVERY_MS) as u64;
    let jitter = (hash_of((&name, sample_no)) % 200) as f64 / 100.0;
    let deploy = a.deploy.as_ref().map(|d| DeployInfo {
        id: d.id.clone(),
        tag: d.tag.clone(),
        previous_tag: d.previous.clone(),
        state: if d.finished_at.is_some() {
            DeployState::Succeeded
        } else {
            DeployState::Running
        },
        step: if d.finished_at.is_some() {
            DeployStep::HealthCheck
        } else {
            DeployStep::Pull
        },
        message: if d.finished_at.is_some() {
            format!("running {} and healthy", d.tag)
        } else {
            "pulling the image".into()
        },
        started_at: d.started_at,
        finished_at: d.finished_at,
        steps: vec![],
    });
    let report = HealthReport {
        status: "ok".into(),
        cpu: 4.0 + jitter,
        memory_total_mb: 8192.0,
        memory_used_mb: 2048.0 + jitter * 10.0,
        disk_total_gb: 40.0,
        disk_used_gb: 10.0,
        adspower_status: None,
        active_profiles: None,
        active_workers: Some(0),
        uptime: ((sample_ms - a.boot_ms) / 1000) as f64,
        image_tag: Some(a.tag.clone()),
        deploy,
        env_sha256: None,
        agent_version: Some("bench-virtual-agent".into()),
        deploy_safe: Some(true),
        browser_engine: Some("chromium".into()),
        browser_status: Some("running".into()),
        checked_at: Timestamp::from_millisecond(sample_ms).ok(),
        checks: vec![],
        targeted_workers: vec![],
        draining_since: None,
    };
    drop(agents);
    Json(report).into_response()
}

async fn deploy(
    State(farm): State<Arc<Farm>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(req): Json<DeployRequest>,
) -> Response {
    farm.deploy_requests.fetch_add(1, Ordering::Relaxed);
    if !authorized(&farm, &headers) {
        return unauthorized();
    }
    let took = *farm.deploy_time.lock().expect("farm");
    let mut agents = farm.agents.lock().expect("farm");
    let a = agents
        .entry(name.clone())
        .or_insert_with(|| new_agent(&farm, &name));
    settle(a);
    if let Some(d) = a.deploy.as_ref().filter(|d| d.finished_at.is_none()) {
        return (
            StatusCode::CONFLICT,
            Json(ErrorBody {
                success: false,
                message: format!("deploy {} of {} is running", d.id, d.tag),
                deploy_id: Some(d.id.clone()),
                sha256: None,
            }),
        )
            .into_response();
    }
    let id = format!("vd-{}", farm.seq.fetch_add(1, Ordering::Relaxed) + 1);
    a.deploy = Some(Deploy {
        id: id.clone(),
        tag: req.image_tag.clone(),
        previous: Some(a.tag.clone()),
        started_at: Timestamp::now(),
        done_at: Instant::now() + took,
        finished_at: None,
    });
    (
        StatusCode::ACCEPTED,
        Json(DeployAccepted {
            success: true,
            message: format!("deploying {}", req.image_tag),
            deploy_id: Some(id),
        }),
    )
        .into_response()
}

async fn drain(
    State(farm): State<Arc<Farm>>,
    Path(_name): Path<String>,
    headers: HeaderMap,
) -> Response {
    farm.drain_requests.fetch_add(1, Ordering::Relaxed);
    if !authorized(&farm, &headers) {
        return unauthorized();
    }
    Json(DrainResponse {
        deploy_safe: true,
        active_workers: Some(0),
    })
    .into_response()
}
