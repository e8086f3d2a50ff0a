//! The CI webhook, compatible with the GhostHands pipeline: `POST
//! /api/v1/webhooks/ghosthands/deploy` creates one SandboxDeploy per delivery.
//!
//! Checks, in order: body size (413), body arrival within the request timeout (408), HMAC-SHA256
//! signature over the raw body in constant time (401), event (400), JSON payload (400),
//! timestamp window when the payload has one (400), environment (400 when none is given and no
//! default is configured or header and payload disagree, 404 when the config lacks it), then
//! the delivery record (below). Every refusal, whatever refuses it (a wrong method: 405; an
//! unknown path under [`PREFIX`]: 404; handling that outlasts the request timeout: 503), is
//! JSON: `{"error": "<what to fix>"}`.
//!
//! **Both senders the GhostHands documents describe are accepted as they send:** the event is
//! `X-GH-Event: deploy_ready` and/or the payload's `"event": "ghosthands.deploy_ready"` (either
//! form in either place; at least one of them); the environment is the `X-GH-Environment`
//! header, else the payload's `environment`, else `webhook.defaultEnvironment`; `timestamp` is
//! optional. Unknown payload fields (`image_latest`, ...) are ignored.
//!
//! **Status.** Every accepted (or duplicate) delivery is answered with the SandboxDeploy's name
//! and a status URL, [`STATUS_PREFIX`]`/<environment>/<name>`. A `GET` on it, signed like a
//! delivery (`X-GH-Webhook-Signature: sha256=<HMAC-SHA256 of the request path>` with the same
//! secret), answers the rollout's phase and counts, so that CI can wait for the rollout and fail
//! with it (`examples/ci/`).
//!
//! **Deliveries are remembered** apart from the SandboxDeploy they create, so deleting a rollout
//! (or the history limit pruning it) never lets a replay of its delivery create it again. The
//! records live in one ConfigMap per environment namespace, [`DELIVERIES`], keyed by the SHA-256
//! of the environment and the raw body (the signed bytes: a replay is the same bytes), each kept
//! until twice the skew window after the payload's timestamp (by then the timestamp check
//! refuses the body anyway) and pruned on the next write. A payload without a timestamp cannot
//! go stale: its record is kept for `webhook.deliveryMemory` (default 30 days), and that record
//! (with the duplicate check on the SandboxDeploy's name) is all that refuses its replay. Being an API object it holds across
//! restarts and leader changes, and every replica (standbys serve the webhook too) reads the
//! same one; every write is guarded by the resourceVersion read, so of two replicas handling
//! one delivery at once exactly one claims it. A record is `pending` until its deploy is
//! created; one left pending by a request that died (or timed out) is taken over once it is
//! older than the request timeout. One object by a fixed name (rather than one per delivery)
//! needs no `list` permission on ConfigMaps: only get and update of that name, and create.
//! The same environment and tag from another delivery (a new timestamp) is still answered as a
//! duplicate while its SandboxDeploy exists, as before.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use hmac::{KeyInit, Mac};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use crate::api::{
    DeployImage, DeployPhase, DeploySource, DeployStrategy, SandboxDeploy, SandboxDeploySpec,
    SandboxSelector,
};

/// The path CI posts to.
pub const PATH: &str = "/api/v1/webhooks/ghosthands/deploy";
/// A deploy's status is at `STATUS_PREFIX/<environment>/<name>` (GET, signed over the path).
pub const STATUS_PREFIX: &str = "/api/v1/webhooks/ghosthands/deploys";
/// The event forms accepted, in the `X-GH-Event` header or the payload's `event`.
pub const EVENTS: [&str; 2] = ["deploy_ready", "ghosthands.deploy_ready"];
/// Every path under this prefix belongs to the webhook (an unknown one is a JSON 404).
pub const PREFIX: &str = "/api/v1/webhooks";
/// The ConfigMap, in each environment's namespace, that remembers the deliveries.
pub const DELIVERIES: &str = "sandbox-operator-webhook-deliveries";
/// A body above the limit is still read (and dropped) up to this size, so that the client, still
/// sending, reads the 413 instead of a reset connection; beyond it the connection is cut.
const DRAIN_LIMIT: usize = 8 << 20;

/// The webhook's configuration (the `webhook:` key of the operator's YAML config file).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookConfig {
    /// A file holding the HMAC secret (first line).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// A Kubernetes Secret key holding the HMAC secret.
    #[serde(default)]
    pub secret_ref: Option<SecretRef>,
    /// How far the payload's `timestamp` may be from now (default 5m).
    #[serde(default = "default_skew")]
    pub max_skew: String,
    /// The largest body accepted, in bytes (default 64 KiB).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// How long one request may take, its body included (default 10s). A body that has not
    /// arrived by then is answered 408; handling that takes longer, 503 (retry).
    #[serde(default = "default_request_timeout")]
    pub request_timeout: String,
    /// What each `X-GH-Environment` value deploys to.
    #[serde(default)]
    pub environments: BTreeMap<String, EnvironmentConfig>,
    /// The environment of a delivery that names none (no `X-GH-Environment` header, no
    /// `environment` in the payload); unset: such a delivery is refused (400).
    #[serde(default)]
    pub default_environment: Option<String>,
    /// How long a delivery without a `timestamp` is remembered as received (default 720h): the
    /// replay protection of such payloads, which never go stale.
    #[serde(default = "default_delivery_memory")]
    pub delivery_memory: String,
}

fn default_delivery_memory() -> String {
    "720h".into()
}

fn default_skew() -> String {
    "5m".into()
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_request_timeout() -> String {
    "10s".into()
}

/// A Secret key, with its namespace.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    /// The namespace.
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
    /// The key.
    pub key: String,
}

/// One environment's deploy settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvironmentConfig {
    /// Where the SandboxDeploy is created.
    pub namespace: String,
    /// Which Sandboxes it rolls to.
    #[serde(default)]
    pub selector: SandboxSelector,
    /// How it paces the rollout.
    #[serde(default)]
    pub strategy: DeployStrategy,
    /// Start at once (true) or wait for approval (false: created paused).
    #[serde(default)]
    pub auto_deploy: bool,
}

/// The operator's YAML config file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorConfig {
    /// The CI webhook; absent: the endpoint answers 404.
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    /// Notification sinks; absent: nobody is told.
    #[serde(default)]
    pub notifications: Option<crate::operator::notify::NotificationsConfig>,
}

/// What the webhook needs at request time.
#[derive(Clone)]
pub struct WebhookState {
    /// The configuration.
    pub config: WebhookConfig,
    /// For reading the secret and creating deploys.
    pub client: kube::Client,
    /// `maxSkew`, parsed.
    skew: Duration,
    /// `requestTimeout`, parsed.
    request_timeout: Duration,
    /// `deliveryMemory`, parsed.
    memory: Duration,
}

impl WebhookState {
    /// Checks the configuration (durations, sizes) and builds the state; the error names the
    /// field to fix.
    pub fn new(config: WebhookConfig, client: kube::Client) -> Result<Self, String> {
        let (skew, request_timeout) = check(&config)?;
        let memory = crate::util::parse_duration(&config.delivery_memory)
            .map_err(|e| format!("webhook.deliveryMemory: {e}"))?;
        Ok(Self {
            config,
            client,
            skew,
            request_timeout,
            memory,
        })
    }
}

/// Checks the configuration: `(maxSkew, requestTimeout)`, or what to fix.
fn check(config: &WebhookConfig) -> Result<(Duration, Duration), String> {
    let skew = crate::util::parse_duration(&config.max_skew)
        .map_err(|e| format!("webhook.maxSkew: {e}"))?;
    let request_timeout = crate::util::parse_duration(&config.request_timeout)
        .map_err(|e| format!("webhook.requestTimeout: {e}"))?;
    if request_timeout.is_zero() {
        return Err("webhook.requestTimeout: must be more than 0s".into());
    }
    if config.max_body_bytes == 0 {
        return Err("webhook.maxBodyBytes: must be more than 0".into());
    }
    if let Some(d) = &config.default_environment
        && !config.environments.contains_key(d)
    {
        return Err(format!(
            "webhook.defaultEnvironment: {d:?} is not one of webhook.environments ({})",
            known(config)
        ));
    }
    Ok((skew, request_timeout))
}

/// The payload CI sends.
#[derive(Debug, Deserialize)]
struct Payload {
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    image: Option<String>,
    image_tag: String,
    #[serde(default)]
    commit_sha: Option<String>,
    #[serde(default)]
    commit_message: Option<String>,
    #[serde(default)]
    branch: Option<String>,
    #[serde(default)]
    repository: Option<String>,
    #[serde(default)]
    run_id: Option<serde_json::Value>,
    #[serde(default)]
    run_url: Option<String>,
    #[serde(default)]
    timestamp: Option<String>,
    #[serde(default)]
    environment: Option<String>,
}

/// The configured environments, for messages.
fn known(config: &WebhookConfig) -> String {
    if config.environments.is_empty() {
        return "none configured".into();
    }
    config
        .environments
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where an environment came from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvironmentSource {
    /// The `X-GH-Environment` header.
    Header,
    /// The payload's `environment`.
    Payload,
    /// `webhook.defaultEnvironment`.
    Default,
}

/// The delivery's environment: the header, else the payload, else the configured default.
/// Header and payload that disagree are refused (the header is not signed; the payload is).
pub fn resolve_environment(
    header: Option<&str>,
    payload: Option<&str>,
    default: Option<&str>,
) -> Result<(String, EnvironmentSource), String> {
    fn clean(v: Option<&str>) -> Option<&str> {
        v.map(str::trim).filter(|v| !v.is_empty())
    }
    match (clean(header), clean(payload)) {
        (Some(h), Some(p)) if h != p => Err(format!(
            "X-GH-Environment {:?} and the payload's environment {:?} disagree: send one, or the same in both",
            trunc(h),
            trunc(p)
        )),
        (Some(h), _) => Ok((h.to_string(), EnvironmentSource::Header)),
        (None, Some(p)) => Ok((p.to_string(), EnvironmentSource::Payload)),
        (None, None) => match clean(default) {
            Some(d) => Ok((d.to_string(), EnvironmentSource::Default)),
            None => Err("no environment: send X-GH-Environment or an \"environment\" field in the payload, or set webhook.defaultEnvironment".into()),
        },
    }
}

/// Checks the event: the header and the payload's field, each optional but not both, each one
/// of [`EVENTS`].
pub fn check_event(header: Option<&str>, payload: Option<&str>) -> Result<(), String> {
    for (what, v) in [("X-GH-Event", header), ("the payload's event", payload)] {
        if let Some(v) = v
            && !EVENTS.contains(&v.trim())
        {
            return Err(format!(
                "unknown event {:?} in {what}: only deploy_ready (or ghosthands.deploy_ready) is handled",
                trunc(v)
            ));
        }
    }
    if header.is_none() && payload.is_none() {
        return Err("no event: send X-GH-Event: deploy_ready or \"event\": \"ghosthands.deploy_ready\" in the payload".into());
    }
    Ok(())
}

/// A value from the request, cut short for a message.
fn trunc(s: &str) -> String {
    s.chars().take(100).collect()
}

/// The status path of a deploy made for `environment`.
pub fn status_path(environment: &str, name: &str) -> String {
    let env: String = environment
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("{STATUS_PREFIX}/{env}/{name}")
}

/// The absolute status URL, from the request's Host (and X-Forwarded-Proto/Host when a proxy
/// set them).
fn status_url(headers: &HeaderMap, path: &str) -> Option<String> {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let host = h("x-forwarded-host").or(h("host"))?;
    let host = host.split(',').next()?.trim();
    if host.is_empty() || host.contains(['/', ' ', '@']) {
        return None;
    }
    let proto = match h("x-forwarded-proto").map(|p| p.split(',').next().unwrap_or("").trim()) {
        Some("https") => "https",
        _ => "http",
    };
    Some(format!("{proto}://{host}{path}"))
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn refuse(status: StatusCode, error: &str) -> Response {
    answer(status, json!({"error": error}))
}

/// A refusal after which the connection is closed (the request was not read to its end).
fn refuse_and_close(status: StatusCode, error: &str) -> Response {
    let mut r = refuse(status, error);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The webhook's routes: [`PATH`] (POST only) and everything else under [`PREFIX`], each
/// refusal JSON. Without a configuration every path under the prefix answers a JSON 404.
pub fn router(state: Option<WebhookState>) -> Router {
    let Some(state) = state else {
        let off = || async {
            refuse(
                StatusCode::NOT_FOUND,
                "the CI webhook is not configured (the webhook key of the operator's --config)",
            )
        };
        return Router::new()
            .route(PREFIX, axum::routing::any(off))
            .route(&format!("{PREFIX}/{{*rest}}"), axum::routing::any(off));
    };
    Router::new()
        .route(
            PATH,
            axum::routing::post(handle).fallback(|| async {
                let mut r = refuse(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!("only POST is accepted on {PATH}"),
                );
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
                r
            }),
        )
        .route(
            &format!("{STATUS_PREFIX}/{{environment}}/{{name}}"),
            axum::routing::get(status).fallback(|| async {
                let mut r = refuse(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "only GET is accepted on a deploy's status URL",
                );
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET"));
                r
            }),
        )
        .route(PREFIX, axum::routing::any(unknown_path))
        .route(
            &format!("{PREFIX}/{{*rest}}"),
            axum::routing::any(unknown_path),
        )
        // The handler reads the body itself, with its own limit, deadline and JSON answers.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

async fn unknown_path(req: Request) -> Response {
    refuse(
        StatusCode::NOT_FOUND,
        &format!(
            "no webhook at {}: CI posts to {PATH}",
            req.uri().path().chars().take(200).collect::<String>()
        ),
    )
}

/// Why a body could not be read.
#[derive(Debug, PartialEq, Eq)]
enum BodyError {
    /// More than the limit (the declared length, or what arrived).
    TooLarge,
    /// The connection failed mid-body.
    Read(String),
}

/// Reads a body of at most `limit` bytes. A larger one is read on (and dropped) up to
/// [`DRAIN_LIMIT`], so that the client reads the answer; then it is refused.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let drain = limit.max(DRAIN_LIMIT);
    if declared.is_some_and(|n| n > drain as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut out = Vec::new();
    let mut seen = 0usize;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
        seen = seen.saturating_add(chunk.len());
        if seen > drain {
            return Err(BodyError::TooLarge);
        }
        if seen <= limit {
            out.extend_from_slice(&chunk);
        }
    }
    if seen > limit {
        return Err(BodyError::TooLarge);
    }
    Ok(Bytes::from(out))
}

async fn secret(state: &WebhookState) -> Result<Vec<u8>, String> {
    if let Some(path) = &state.config.secret_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the webhook secret file {}: {e}", path.display()))?;
        return Ok(text
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .as_bytes()
            .to_vec());
    }
    if let Some(r) = &state.config.secret_ref {
        let api: Api<Secret> = Api::namespaced(state.client.clone(), &r.namespace);
        let s = api
            .get(&r.name)
            .await
            .map_err(|e| format!("reading the webhook Secret {}/{}: {e}", r.namespace, r.name))?;
        let v = s.data.and_then(|d| d.get(&r.key).cloned()).ok_or_else(|| {
            format!(
                "the webhook Secret {}/{} has no key {}",
                r.namespace, r.name, r.key
            )
        })?;
        return Ok(String::from_utf8_lossy(&v.0).trim().as_bytes().to_vec());
    }
    Err("no webhook secret configured (secretFile or secretRef)".into())
}

/// Whether `header` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under `key`, compared in
/// constant time.
pub fn signature_valid(key: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(key) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// The SandboxDeploy name for an environment and tag: DNS-1123, at most 63 characters, the
/// same for the same delivery.
pub fn deploy_name(environment: &str, tag: &str) -> String {
    let clean = |s: &str| -> String {
        let mut out: String = s
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        while out.contains("--") {
            out = out.replace("--", "-");
        }
        out.trim_matches('-').to_string()
    };
    let name = format!("{}-{}", clean(environment), clean(tag));
    if name.len() <= 63 {
        return name;
    }
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(
        format!("{environment}/{tag}").as_bytes(),
    ));
    format!("{}-{}", name[..54].trim_end_matches('-'), &digest[..8])
}

/// The handler: reads the body within the request timeout, then handles the delivery within
/// what is left of it.
pub async fn handle(State(state): State<WebhookState>, req: Request) -> Response {
    let started = Instant::now();
    let limit = state.config.max_body_bytes;
    let timeout = state.request_timeout;
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(timeout, read_body(&parts.headers, body, limit)).await {
        Err(_) => {
            return refuse_and_close(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the request body did not arrive within {} (requestTimeout)",
                    state.config.request_timeout
                ),
            );
        }
        Ok(Err(BodyError::TooLarge)) => {
            return refuse_and_close(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("body larger than {limit} bytes (maxBodyBytes)"),
            );
        }
        Ok(Err(BodyError::Read(e))) => {
            return refuse_and_close(
                StatusCode::BAD_REQUEST,
                &format!("reading the request body failed: {e}"),
            );
        }
        Ok(Ok(b)) => b,
    };
    let left = timeout.saturating_sub(started.elapsed());
    match tokio::time::timeout(left, deliver(&state, &parts.headers, body)).await {
        Ok(r) => r,
        Err(_) => {
            warn!(timeout = %state.config.request_timeout, "webhook: handling a delivery timed out");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "handling the delivery took longer than {} (requestTimeout); retry it",
                    state.config.request_timeout
                ),
            )
        }
    }
}

async fn deliver(state: &WebhookState, headers: &HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let Some(signature) = header("x-gh-webhook-signature") else {
        return refuse(StatusCode::UNAUTHORIZED, "missing X-GH-Webhook-Signature");
    };
    let key = match secret(state).await {
        Ok(k) => k,
        Err(e) => {
            warn!(error = %e, "webhook: no usable secret");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the webhook secret is not available",
            );
        }
    };
    if !signature_valid(&key, &body, &signature) {
        return refuse(StatusCode::UNAUTHORIZED, "bad signature");
    }
    let event_header = header("x-gh-event");
    // The header alone is checked before the body is parsed, so a wrong event is named as such.
    if let Some(e) = &event_header
        && let Err(e) = check_event(Some(e), None)
    {
        return refuse(StatusCode::BAD_REQUEST, &e);
    }
    let payload: Payload = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &format!("bad payload: {e}")),
    };
    if let Err(e) = check_event(event_header.as_deref(), payload.event.as_deref()) {
        return refuse(StatusCode::BAD_REQUEST, &e);
    }
    if !crate::agent::protocol::is_valid_image_tag(&payload.image_tag) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "image_tag is not a valid docker tag",
        );
    }
    let now = Timestamp::now();
    // No timestamp (the older sender): nothing goes stale, the delivery record refuses replays.
    let ts = match &payload.timestamp {
        None => None,
        Some(t) => {
            let Ok(ts) = t.parse::<Timestamp>() else {
                return refuse(StatusCode::BAD_REQUEST, "timestamp is not an RFC 3339 time");
            };
            let off = (now.as_second() - ts.as_second()).unsigned_abs();
            if off > state.skew.as_secs() {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "stale timestamp: {off}s from now, more than {}",
                        state.config.max_skew
                    ),
                );
            }
            Some(ts)
        }
    };
    let (environment, from) = match resolve_environment(
        header("x-gh-environment").as_deref(),
        payload.environment.as_deref(),
        state.config.default_environment.as_deref(),
    ) {
        Ok(e) => e,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &e),
    };
    let Some(env) = state.config.environments.get(&environment) else {
        let from = match from {
            EnvironmentSource::Header => "X-GH-Environment",
            EnvironmentSource::Payload => "the payload's environment",
            EnvironmentSource::Default => "webhook.defaultEnvironment",
        };
        warn!(environment = %trunc(&environment), "webhook: a signed delivery for an environment the config lacks, refused");
        return refuse(
            StatusCode::NOT_FOUND,
            &format!(
                "unknown environment {:?} (from {from}): this operator deploys to {} (webhook.environments); send one of them, or add it to the operator's config. Nothing was created or recorded",
                trunc(&environment),
                known(&state.config)
            ),
        );
    };
    let name = deploy_name(&environment, &payload.image_tag);
    let ns = env.namespace.clone();

    // ---- The delivery's record: claimed before anything is created. ----
    let records = Records::new(state.client.clone(), &ns);
    let key = delivery_key(&environment, &body);
    let record = new_delivery(&environment, &name, ts, now, state.skew, state.memory);
    let path = status_path(&environment, &name);
    let url = status_url(headers, &path);
    match records
        .claim(&key, &record, now, state.request_timeout)
        .await
    {
        Ok(Claim::Claimed) => {}
        Ok(Claim::Delivered { received_at }) => {
            info!(deploy = %name, namespace = %ns, record = %key, "webhook: replayed delivery refused");
            return answer(
                StatusCode::OK,
                json!({
                    "status": "duplicate",
                    "reason": format!("this delivery was already received at {received_at}; it never creates a SandboxDeploy twice, even once that one is deleted"),
                    "name": name,
                    "namespace": ns,
                    "environment": environment,
                    "status_path": path,
                    "status_url": url,
                }),
            );
        }
        Ok(Claim::InProgress) => {
            return refuse(
                StatusCode::CONFLICT,
                "this delivery is being handled by another request; retry in a few seconds",
            );
        }
        Ok(Claim::Full) => {
            warn!(namespace = %ns, "webhook: too many deliveries within the skew window");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many deliveries within the skew window; retry later",
            );
        }
        Err(e) => {
            warn!(error = %e, namespace = %ns, "webhook: recording the delivery failed");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "recording the delivery failed; retry later",
            );
        }
    }

    let truncate = |s: Option<String>, n: usize| s.map(|s| s.chars().take(n).collect::<String>());
    let deploy = SandboxDeploy {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(BTreeMap::from([
                (
                    "fleet.valet.dev/environment".to_string(),
                    environment.clone(),
                ),
                ("fleet.valet.dev/source".to_string(), "webhook".to_string()),
            ])),
            ..Default::default()
        },
        spec: SandboxDeploySpec {
            image: DeployImage {
                repository: truncate(
                    payload
                        .image
                        .map(|i| i.rsplit_once(':').map(|(r, _)| r.to_string()).unwrap_or(i)),
                    512,
                ),
                tag: payload.image_tag.clone(),
            },
            selector: env.selector.clone(),
            strategy: env.strategy.clone(),
            paused: !env.auto_deploy,
            source: Some(DeploySource {
                commit_sha: truncate(payload.commit_sha, 64),
                commit_message: truncate(payload.commit_message, 1024),
                branch: truncate(payload.branch, 256),
                repository: truncate(payload.repository, 256),
                run_id: truncate(
                    payload.run_id.map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    }),
                    64,
                ),
                run_url: truncate(payload.run_url, 1024),
            }),
        },
        status: None,
    };
    let api: Api<SandboxDeploy> = Api::namespaced(state.client.clone(), &ns);
    let created = api.create(&PostParams::default(), &deploy).await;
    match created {
        Ok(_) => {
            records.delivered(&key).await;
            info!(deploy = %name, namespace = %ns, paused = !env.auto_deploy, "webhook: SandboxDeploy created");
            answer(
                StatusCode::ACCEPTED,
                json!({
                    "status": "deploy_created", "name": name, "namespace": ns,
                    "environment": environment, "paused": !env.auto_deploy,
                    "status_path": path, "status_url": url,
                }),
            )
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            // Another delivery of the same environment and tag made it: this one is handled.
            records.delivered(&key).await;
            answer(
                StatusCode::OK,
                json!({
                    "status": "duplicate",
                    "reason": format!("SandboxDeploy {name} already exists for this environment and tag"),
                    "name": name,
                    "namespace": ns,
                    "environment": environment,
                    "status_path": path,
                    "status_url": url,
                }),
            )
        }
        Err(e) => {
            // Nothing was created: drop the claim so that CI's retry of this delivery works.
            records.release(&key).await;
            match e {
                kube::Error::Api(s) if s.code == 422 || s.code == 400 => refuse(
                    StatusCode::BAD_REQUEST,
                    &format!("the deploy was refused: {}", s.message),
                ),
                e => {
                    warn!(error = %e, "webhook: creating the SandboxDeploy failed");
                    refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "creating the SandboxDeploy failed; retry later",
                    )
                }
            }
        }
    }
}

/// The phases after which a rollout changes no more.
fn finished(phase: Option<DeployPhase>) -> bool {
    matches!(
        phase,
        Some(
            DeployPhase::Succeeded
                | DeployPhase::Failed
                | DeployPhase::Aborted
                | DeployPhase::Superseded
        )
    )
}

/// `GET STATUS_PREFIX/<environment>/<name>`: the rollout's phase and counts, for a CI job that
/// waits on it. Authenticated like a delivery: `X-GH-Webhook-Signature: sha256=<hex
/// HMAC-SHA256 of the request path>` with the webhook's secret (401 otherwise); an environment
/// the config lacks or a deploy that is not in its namespace: 404. Every answer is JSON.
async fn status(
    State(state): State<WebhookState>,
    path: Result<axum::extract::Path<(String, String)>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let run = async {
        let Some(signature) = headers
            .get("x-gh-webhook-signature")
            .and_then(|v| v.to_str().ok())
        else {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "missing X-GH-Webhook-Signature: sha256=<hex HMAC-SHA256 of the request path with the webhook secret>",
            );
        };
        let key = match secret(&state).await {
            Ok(k) => k,
            Err(e) => {
                warn!(error = %e, "webhook: no usable secret");
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the webhook secret is not available",
                );
            }
        };
        if !signature_valid(&key, uri.path().as_bytes(), signature) {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "bad signature: X-GH-Webhook-Signature must be sha256=<hex HMAC-SHA256 of the request path (without the query) with the webhook secret>",
            );
        }
        let Ok(axum::extract::Path((environment, name))) = path else {
            return refuse(StatusCode::NOT_FOUND, "not a deploy's status path");
        };
        let Some(env) = state.config.environments.get(&environment) else {
            return refuse(
                StatusCode::NOT_FOUND,
                &format!(
                    "unknown environment {:?}: this operator deploys to {}",
                    trunc(&environment),
                    known(&state.config)
                ),
            );
        };
        let api: Api<SandboxDeploy> = Api::namespaced(state.client.clone(), &env.namespace);
        let d = match api.get_opt(&name).await {
            Ok(Some(d)) => d,
            Ok(None) => {
                return refuse(
                    StatusCode::NOT_FOUND,
                    &format!(
                        "no SandboxDeploy {:?} in environment {environment:?} (namespace {})",
                        trunc(&name),
                        env.namespace
                    ),
                );
            }
            Err(e) => {
                warn!(error = %e, deploy = %name, "webhook: reading a deploy's status failed");
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "reading the SandboxDeploy failed; retry",
                );
            }
        };
        let st = d.status.clone().unwrap_or_default();
        // Not reconciled yet: nothing has happened, which Pending says.
        let phase = st.phase.unwrap_or(DeployPhase::Pending);
        let observed =
            st.observed_generation.is_some() && st.observed_generation == d.metadata.generation;
        answer(
            StatusCode::OK,
            json!({
                "name": name,
                "namespace": env.namespace,
                "environment": environment,
                "tag": d.spec.image.tag,
                "paused": d.spec.paused,
                "phase": phase,
                "observed": observed,
                "done": finished(st.phase),
                "succeeded": st.phase == Some(DeployPhase::Succeeded),
                "total": st.total,
                "updated": st.updated,
                "failed": st.failed,
                "skipped": st.skipped,
                "wave": st.wave,
                "message": st.message,
            }),
        )
    };
    match tokio::time::timeout(state.request_timeout, run).await {
        Ok(r) => r,
        Err(_) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "reading the deploy's status took longer than requestTimeout; retry",
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Delivery records.
// ---------------------------------------------------------------------------------------------

/// The record of one delivery, a value in the records ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// `pending` while its deploy is being created, then `delivered`.
    pub state: String,
    /// The environment it was for.
    pub environment: String,
    /// The SandboxDeploy it made.
    pub deploy: String,
    /// The payload's timestamp, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// When it was (last) claimed.
    pub received_at: String,
    /// When the record may go: two skew windows past the payload's timestamp.
    pub keep_until: String,
}

const STATE_PENDING: &str = "pending";
const STATE_DELIVERED: &str = "delivered";
/// More records than this inside the window is not CI: refused rather than forgotten.
const MAX_RECORDS: usize = 5000;

/// The record's key: from the environment and the raw body (what the signature covers).
pub fn delivery_key(environment: &str, body: &[u8]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(environment.as_bytes());
    h.update([0u8]);
    h.update(body);
    hex::encode(h.finalize())[..40].to_string()
}

/// The record of a delivery being handled now. With a timestamp it is kept two skew windows
/// past it; without one (the body never goes stale) for `memory`.
fn new_delivery(
    environment: &str,
    deploy: &str,
    timestamp: Option<Timestamp>,
    now: Timestamp,
    skew: Duration,
    memory: Duration,
) -> Delivery {
    // The body is accepted until `timestamp + skew` by this replica's clock; another skew
    // window on top covers replicas whose clocks differ.
    let keep_until = match timestamp {
        Some(t) => t.max(now).saturating_add(skew.saturating_mul(2)),
        None => now.saturating_add(memory),
    }
    .unwrap_or(Timestamp::MAX);
    Delivery {
        state: STATE_PENDING.into(),
        environment: environment.into(),
        deploy: deploy.into(),
        timestamp: timestamp.map(|t| t.to_string()),
        received_at: whole_seconds(now).to_string(),
        keep_until: whole_seconds(keep_until).to_string(),
    }
}

fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// What claiming a delivery gave.
#[derive(Debug, PartialEq, Eq)]
enum Claim {
    /// This request handles it.
    Claimed,
    /// It was handled before.
    Delivered {
        /// When it was received.
        received_at: String,
    },
    /// Another request is handling it right now.
    InProgress,
    /// The window holds too many records.
    Full,
}

/// Drops the records whose time is up (or that cannot be read). Returns whether any went.
fn prune(records: &mut BTreeMap<String, String>, now: Timestamp) -> bool {
    let before = records.len();
    records.retain(|_, v| {
        serde_json::from_str::<Delivery>(v)
            .ok()
            .and_then(|d| d.keep_until.parse::<Timestamp>().ok())
            .is_some_and(|t| t >= now)
    });
    records.len() != before
}

/// Claims `key` for `new` in `records` (pruned first): a pure decision on the records and the
/// clock. A record pending for longer than `stale_after` (the request timeout) was abandoned by
/// a request that died or timed out, and is taken over.
fn claim_in(
    records: &mut BTreeMap<String, String>,
    key: &str,
    new: &Delivery,
    now: Timestamp,
    stale_after: Duration,
) -> Claim {
    prune(records, now);
    if let Some(old) = records
        .get(key)
        .and_then(|v| serde_json::from_str::<Delivery>(v).ok())
    {
        if old.state != STATE_PENDING {
            return Claim::Delivered {
                received_at: old.received_at,
            };
        }
        let age = old
            .received_at
            .parse::<Timestamp>()
            .ok()
            .and_then(|t| Duration::try_from(t.duration_until(now)).ok());
        if age.is_some_and(|a| a <= stale_after) {
            return Claim::InProgress;
        }
    } else if records.len() >= MAX_RECORDS {
        return Claim::Full;
    }
    records.insert(
        key.to_string(),
        serde_json::to_string(new).expect("a record serializes"),
    );
    Claim::Claimed
}

/// The namespace's records: one ConfigMap, read and written whole, every write guarded by the
/// resourceVersion read (a conflict is read again and retried).
struct Records {
    api: Api<ConfigMap>,
}

impl Records {
    fn new(client: kube::Client, ns: &str) -> Self {
        Self {
            api: Api::namespaced(client, ns),
        }
    }

    /// Applies `edit` to the records and writes them when it says so; returns its answer.
    async fn update<T>(
        &self,
        mut edit: impl FnMut(&mut BTreeMap<String, String>) -> (T, bool),
    ) -> Result<T, kube::Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = self.api.get_opt(DELIVERIES).await?;
            let mut data = current
                .as_ref()
                .and_then(|c| c.data.clone())
                .unwrap_or_default();
            let (answer, write) = edit(&mut data);
            if !write {
                return Ok(answer);
            }
            let written = match &current {
                None => {
                    let cm = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(DELIVERIES.into()),
                            labels: Some(BTreeMap::from([(
                                "app.kubernetes.io/managed-by".to_string(),
                                "sandbox-operator".to_string(),
                            )])),
                            ..Default::default()
                        },
                        data: Some(data),
                        ..Default::default()
                    };
                    self.api.create(&PostParams::default(), &cm).await
                }
                Some(c) => {
                    let mut cm = c.clone();
                    cm.data = Some(data);
                    self.api
                        .replace(DELIVERIES, &PostParams::default(), &cm)
                        .await
                }
            };
            match written {
                Ok(_) => return Ok(answer),
                Err(kube::Error::Api(s)) if s.code == 409 && attempt < 10 => {
                    // Another request wrote meanwhile: read again.
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn claim(
        &self,
        key: &str,
        new: &Delivery,
        now: Timestamp,
        stale_after: Duration,
    ) -> Result<Claim, kube::Error> {
        self.update(|data| {
            let before = data.clone();
            let c = claim_in(data, key, new, now, stale_after);
            let changed = *data != before;
            (c, changed)
        })
        .await
    }

    /// Marks the record delivered (a record left pending could be taken over by a replay once
    /// its deploy is gone).
    async fn delivered(&self, key: &str) {
        let r = self
            .update(|data| {
                let Some(mut d) = data
                    .get(key)
                    .and_then(|v| serde_json::from_str::<Delivery>(v).ok())
                else {
                    return ((), false);
                };
                d.state = STATE_DELIVERED.into();
                data.insert(key.into(), serde_json::to_string(&d).expect("serializes"));
                ((), true)
            })
            .await;
        if let Err(e) = r {
            warn!(record = %key, error = %e, "webhook: marking the delivery record failed");
        }
    }

    /// Drops a claim whose deploy was not created, so that CI's retry of it works.
    async fn release(&self, key: &str) {
        let r = self.update(|data| ((), data.remove(key).is_some())).await;
        if let Err(e) = r {
            warn!(record = %key, error = %e, "webhook: releasing the delivery record failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        let key = b"s3cret";
        let body = br#"{"image_tag":"abc"}"#;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
        mac.update(body);
        let good = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert!(signature_valid(key, body, &good));
        assert!(!signature_valid(b"other", body, &good));
        assert!(!signature_valid(key, b"{}", &good));
        assert!(!signature_valid(key, body, "sha1=abc"));
        assert!(!signature_valid(key, body, "sha256=zz"));
    }

    #[test]
    fn delivery_keys_are_by_environment_and_body() {
        let a = delivery_key("staging", b"{\"image_tag\":\"abc\"}");
        assert_eq!(a, delivery_key("staging", b"{\"image_tag\":\"abc\"}"));
        assert_ne!(a, delivery_key("production", b"{\"image_tag\":\"abc\"}"));
        assert_ne!(a, delivery_key("staging", b"{\"image_tag\":\"abd\"}"));
        // A valid ConfigMap key.
        assert_eq!(a.len(), 40);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// A record of a timestamped delivery.
    fn nd(env: &str, deploy: &str, ts: Timestamp, now: Timestamp, skew: Duration) -> Delivery {
        new_delivery(env, deploy, Some(ts), now, skew, Duration::from_secs(3600))
    }

    #[test]
    fn a_delivery_without_timestamp_is_remembered_for_the_delivery_memory() {
        let d = new_delivery(
            "staging",
            "staging-abc",
            None,
            at("2026-03-01T12:00:00Z"),
            Duration::from_secs(300),
            Duration::from_secs(30 * 86400),
        );
        assert_eq!(d.timestamp, None);
        assert_eq!(d.keep_until, "2026-03-31T12:00:00Z");
        // Its replay a day later (the timestamp check cannot refuse it) is still a duplicate.
        let mut records = BTreeMap::new();
        let t0 = at("2026-03-01T12:00:00Z");
        let timeout = Duration::from_secs(10);
        assert_eq!(claim_in(&mut records, "k", &d, t0, timeout), Claim::Claimed);
        let mut done = d.clone();
        done.state = STATE_DELIVERED.into();
        records.insert("k".into(), serde_json::to_string(&done).unwrap());
        assert!(matches!(
            claim_in(&mut records, "k", &d, at("2026-03-02T12:00:00Z"), timeout),
            Claim::Delivered { .. }
        ));
        // A record written before timestamps became optional still reads.
        let old = r#"{"state":"delivered","environment":"staging","deploy":"x","timestamp":"2026-03-01T12:00:00Z","receivedAt":"2026-03-01T12:00:00Z","keepUntil":"2026-03-01T12:10:00Z"}"#;
        let old: Delivery = serde_json::from_str(old).unwrap();
        assert_eq!(old.timestamp.as_deref(), Some("2026-03-01T12:00:00Z"));
    }

    #[test]
    fn environments_come_from_the_header_then_the_payload_then_the_default() {
        use EnvironmentSource::*;
        let r = resolve_environment;
        assert_eq!(
            r(Some("staging"), None, Some("production")).unwrap(),
            ("staging".into(), Header)
        );
        assert_eq!(
            r(None, Some("staging"), Some("production")).unwrap(),
            ("staging".into(), Payload)
        );
        // Seed 001 sends both, the same.
        assert_eq!(
            r(Some("staging"), Some("staging"), None).unwrap(),
            ("staging".into(), Header)
        );
        assert_eq!(
            r(None, None, Some("production")).unwrap(),
            ("production".into(), Default)
        );
        assert_eq!(
            r(Some(" "), None, Some("p")).unwrap(),
            ("p".into(), Default)
        );
        let e = r(None, None, None).unwrap_err();
        assert!(e.contains("defaultEnvironment"), "{e}");
        let e = r(Some("staging"), Some("production"), None).unwrap_err();
        assert!(e.contains("disagree"), "{e}");
    }

    #[test]
    fn events_in_either_place_in_either_form() {
        for (h, p) in [
            (Some("deploy_ready"), Some("ghosthands.deploy_ready")),
            (Some("deploy_ready"), None),
            (None, Some("ghosthands.deploy_ready")),
            (None, Some("deploy_ready")),
            (Some("ghosthands.deploy_ready"), None),
        ] {
            assert_eq!(check_event(h, p), Ok(()), "{h:?} {p:?}");
        }
        assert!(check_event(None, None).unwrap_err().contains("no event"));
        assert!(
            check_event(Some("push"), None)
                .unwrap_err()
                .contains("push")
        );
        assert!(
            check_event(Some("deploy_ready"), Some("ghosthands.deleted"))
                .unwrap_err()
                .contains("payload")
        );
    }

    #[test]
    fn status_paths_and_urls() {
        assert_eq!(
            status_path("staging", "staging-abc"),
            "/api/v1/webhooks/ghosthands/deploys/staging/staging-abc"
        );
        assert_eq!(
            status_path("a b/c", "n"),
            "/api/v1/webhooks/ghosthands/deploys/a%20b%2Fc/n"
        );
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("ops.example:8080"));
        assert_eq!(
            status_url(&h, "/p").as_deref(),
            Some("http://ops.example:8080/p")
        );
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("x-forwarded-host", HeaderValue::from_static("ci.example"));
        assert_eq!(
            status_url(&h, "/p").as_deref(),
            Some("https://ci.example/p")
        );
        assert_eq!(status_url(&HeaderMap::new(), "/p"), None);
    }

    #[test]
    fn the_example_config_passes_the_start_checks() {
        let c: OperatorConfig =
            serde_yaml::from_str(include_str!("../../examples/operator-config.yaml")).unwrap();
        let w = c.webhook.unwrap();
        assert_eq!(w.default_environment.as_deref(), Some("staging"));
        check(&w).unwrap();
        crate::util::parse_duration(&w.delivery_memory).unwrap();
        let n = c.notifications.unwrap().check().unwrap();
        assert_eq!(
            n.sinks.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["ops-slack", "audit"]
        );
        assert!(n.sinks[1].events.is_none(), "no filter: every event");
    }

    #[test]
    fn a_default_environment_must_be_configured() {
        let c: WebhookConfig = serde_yaml::from_str(
            "defaultEnvironment: qa\nenvironments: {staging: {namespace: s}}\n",
        )
        .unwrap();
        let e = check(&c).unwrap_err();
        assert!(
            e.starts_with("webhook.defaultEnvironment") && e.contains("staging"),
            "{e}"
        );
    }

    #[test]
    fn a_record_is_kept_two_skew_windows_past_its_timestamp() {
        let skew = Duration::from_secs(300);
        let d = nd(
            "staging",
            "staging-abc",
            at("2026-03-01T12:00:00Z"),
            at("2026-03-01T12:01:00.5Z"),
            skew,
        );
        assert_eq!(d.state, STATE_PENDING);
        assert_eq!(d.received_at, "2026-03-01T12:01:00Z");
        assert_eq!(d.keep_until, "2026-03-01T12:11:00Z");
        assert_eq!(d.deploy, "staging-abc");
        // A timestamp ahead of the clock (within the skew) counts from the timestamp.
        let d = nd(
            "staging",
            "n",
            at("2026-03-01T12:04:00Z"),
            at("2026-03-01T12:01:00Z"),
            skew,
        );
        assert_eq!(d.keep_until, "2026-03-01T12:14:00Z");
    }

    #[test]
    fn claims_duplicates_takeovers_and_pruning() {
        let skew = Duration::from_secs(300);
        let timeout = Duration::from_secs(10);
        let t0 = at("2026-03-01T12:00:00Z");
        let mut records = BTreeMap::new();
        let d = nd("staging", "staging-abc", t0, t0, skew);
        // First: claimed, recorded pending.
        assert_eq!(claim_in(&mut records, "k", &d, t0, timeout), Claim::Claimed);
        // The same delivery while the first request works: in progress.
        let t1 = at("2026-03-01T12:00:05Z");
        let again = nd("staging", "staging-abc", t0, t1, skew);
        assert_eq!(
            claim_in(&mut records, "k", &again, t1, timeout),
            Claim::InProgress
        );
        // The first request died: past the request timeout the record is taken over.
        let t2 = at("2026-03-01T12:00:11Z");
        let late = nd("staging", "staging-abc", t0, t2, skew);
        assert_eq!(
            claim_in(&mut records, "k", &late, t2, timeout),
            Claim::Claimed
        );
        let stored: Delivery = serde_json::from_str(&records["k"]).unwrap();
        assert_eq!(stored.received_at, "2026-03-01T12:00:11Z");
        // Delivered: a duplicate, whatever became of its deploy, until the record's time is up.
        let mut done = stored.clone();
        done.state = STATE_DELIVERED.into();
        records.insert("k".into(), serde_json::to_string(&done).unwrap());
        for t in ["2026-03-01T12:00:12Z", "2026-03-01T12:09:59Z"] {
            assert_eq!(
                claim_in(&mut records, "k", &late, at(t), timeout),
                Claim::Delivered {
                    received_at: "2026-03-01T12:00:11Z".into()
                },
                "{t}"
            );
        }
        // Other deliveries are their own records.
        assert_eq!(
            claim_in(&mut records, "k2", &late, t2, timeout),
            Claim::Claimed
        );
        // Past keepUntil (ts + 2 skews) records are pruned: by then the body is stale anyway.
        let later = at("2026-03-01T12:10:12Z");
        assert!(prune(&mut records, later));
        assert!(records.is_empty());
        // Unreadable records are pruned too, never a panic.
        records.insert("junk".into(), "{".into());
        assert!(prune(&mut records, t0));
        // A full window is refused, not forgotten.
        for i in 0..MAX_RECORDS {
            records.insert(format!("r{i}"), serde_json::to_string(&d).unwrap());
        }
        assert_eq!(claim_in(&mut records, "new", &d, t0, timeout), Claim::Full);
    }

    #[tokio::test]
    async fn bodies_are_read_up_to_the_limit_and_drained_beyond_it() {
        let h = HeaderMap::new();
        let ok = read_body(&h, Body::from(vec![b'a'; 100]), 100).await;
        assert_eq!(ok.unwrap().len(), 100);
        let big = read_body(&h, Body::from(vec![b'a'; 101]), 100).await;
        assert_eq!(big, Err(BodyError::TooLarge));
        // Arriving in pieces, past the limit: every piece is read, then refused.
        let chunks = futures::stream::iter(
            (0..10).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'b'; 50]))),
        );
        let r = read_body(&h, Body::from_stream(chunks), 100).await;
        assert_eq!(r, Err(BodyError::TooLarge));
        // A declared length past the drain limit is refused unread.
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from_str(&(DRAIN_LIMIT + 1).to_string()).unwrap(),
        );
        let r = read_body(&h, Body::from(vec![b'a'; 10]), 100).await;
        assert_eq!(r, Err(BodyError::TooLarge));
    }

    #[test]
    fn bad_durations_in_the_config_are_refused_naming_the_field() {
        let cfg = |skew: &str, timeout: &str| -> WebhookConfig {
            serde_yaml::from_str(&format!(
                "maxSkew: {skew}\nrequestTimeout: {timeout}\nenvironments: {{}}\n"
            ))
            .unwrap()
        };
        let defaults: WebhookConfig = serde_yaml::from_str("environments: {}").unwrap();
        assert_eq!(defaults.request_timeout, "10s");
        assert_eq!(
            check(&cfg("soon", "10s")).unwrap_err().split(':').next(),
            Some("webhook.maxSkew")
        );
        assert_eq!(
            check(&cfg("5m", "later")).unwrap_err().split(':').next(),
            Some("webhook.requestTimeout")
        );
        assert!(check(&cfg("5m", "0s")).is_err());
        assert_eq!(
            check(&cfg("5m", "2s")).unwrap(),
            (Duration::from_secs(300), Duration::from_secs(2))
        );
    }

    #[test]
    fn names_are_dns_labels_and_stable() {
        assert_eq!(deploy_name("staging", "abc123"), "staging-abc123");
        assert_eq!(deploy_name("Prod", "v1.2.3_rc"), "prod-v1-2-3-rc");
        let long = deploy_name("production", &"a".repeat(120));
        assert!(long.len() <= 63);
        assert_eq!(long, deploy_name("production", &"a".repeat(120)));
        assert_ne!(long, deploy_name("production", &"a".repeat(121)));
    }
}
