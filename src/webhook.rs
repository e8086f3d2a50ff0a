//! The CI webhook, compatible with the GhostHands pipeline: `POST
//! /api/v1/webhooks/ghosthands/deploy` creates one SandboxDeploy per delivery.
//!
//! Checks, in order: body size (413), HMAC-SHA256 signature over the raw body in constant time
//! (401), event (400), JSON payload (400), timestamp window (400), environment (404). The
//! SandboxDeploy is named from the environment and tag, so a repeated delivery is answered as a
//! duplicate and creates nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{KeyInit, Mac};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use crate::api::{
    DeployImage, DeploySource, DeployStrategy, SandboxDeploy, SandboxDeploySpec, SandboxSelector,
};

/// The path CI posts to.
pub const PATH: &str = "/api/v1/webhooks/ghosthands/deploy";

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
    /// What each `X-GH-Environment` value deploys to.
    #[serde(default)]
    pub environments: BTreeMap<String, EnvironmentConfig>,
}

fn default_skew() -> String {
    "5m".into()
}
fn default_max_body() -> usize {
    64 * 1024
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
}

/// What the webhook needs at request time.
#[derive(Clone)]
pub struct WebhookState {
    /// The configuration.
    pub config: WebhookConfig,
    /// For reading the secret and creating deploys.
    pub client: kube::Client,
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
    timestamp: String,
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn refuse(status: StatusCode, error: &str) -> Response {
    answer(status, json!({"error": error}))
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

/// The handler.
pub async fn handle(
    State(state): State<WebhookState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if body.len() > state.config.max_body_bytes {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {} bytes", state.config.max_body_bytes),
        );
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let Some(signature) = header("x-gh-webhook-signature") else {
        return refuse(StatusCode::UNAUTHORIZED, "missing X-GH-Webhook-Signature");
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
    if !signature_valid(&key, &body, &signature) {
        return refuse(StatusCode::UNAUTHORIZED, "bad signature");
    }
    let event = header("x-gh-event").unwrap_or_default();
    if event != "deploy_ready" {
        return refuse(
            StatusCode::BAD_REQUEST,
            &format!("unknown event {event:?}: only deploy_ready is handled"),
        );
    }
    let payload: Payload = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &format!("bad payload: {e}")),
    };
    if payload
        .event
        .as_deref()
        .is_some_and(|e| e != "ghosthands.deploy_ready" && e != "deploy_ready")
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            "payload event is not ghosthands.deploy_ready",
        );
    }
    if !crate::agent::protocol::is_valid_image_tag(&payload.image_tag) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "image_tag is not a valid docker tag",
        );
    }
    let skew =
        crate::util::parse_duration(&state.config.max_skew).unwrap_or(Duration::from_secs(300));
    let Ok(ts) = payload.timestamp.parse::<k8s_openapi::jiff::Timestamp>() else {
        return refuse(StatusCode::BAD_REQUEST, "timestamp is not an RFC 3339 time");
    };
    let off = (k8s_openapi::jiff::Timestamp::now().as_second() - ts.as_second()).unsigned_abs();
    if off > skew.as_secs() {
        return refuse(
            StatusCode::BAD_REQUEST,
            &format!(
                "stale timestamp: {off}s from now, more than {}",
                state.config.max_skew
            ),
        );
    }
    let environment = header("x-gh-environment").unwrap_or_default();
    let Some(env) = state.config.environments.get(&environment) else {
        return refuse(
            StatusCode::NOT_FOUND,
            &format!("unknown environment {environment:?}"),
        );
    };
    let name = deploy_name(&environment, &payload.image_tag);
    let truncate = |s: Option<String>, n: usize| s.map(|s| s.chars().take(n).collect::<String>());
    let deploy = SandboxDeploy {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(env.namespace.clone()),
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
    let api: Api<SandboxDeploy> = Api::namespaced(state.client.clone(), &env.namespace);
    match api.create(&PostParams::default(), &deploy).await {
        Ok(_) => {
            info!(deploy = %name, namespace = %env.namespace, paused = !env.auto_deploy, "webhook: SandboxDeploy created");
            answer(
                StatusCode::ACCEPTED,
                json!({"status": "deploy_created", "name": name, "namespace": env.namespace, "paused": !env.auto_deploy}),
            )
        }
        Err(kube::Error::Api(s)) if s.code == 409 => answer(
            StatusCode::OK,
            json!({"status": "duplicate", "name": name, "namespace": env.namespace}),
        ),
        Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => refuse(
            StatusCode::BAD_REQUEST,
            &format!("the deploy was refused: {}", s.message),
        ),
        Err(e) => {
            warn!(error = %e, "webhook: creating the SandboxDeploy failed");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "creating the SandboxDeploy failed; retry later",
            )
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
    fn names_are_dns_labels_and_stable() {
        assert_eq!(deploy_name("staging", "abc123"), "staging-abc123");
        assert_eq!(deploy_name("Prod", "v1.2.3_rc"), "prod-v1-2-3-rc");
        let long = deploy_name("production", &"a".repeat(120));
        assert!(long.len() <= 63);
        assert_eq!(long, deploy_name("production", &"a".repeat(120)));
        assert_ne!(long, deploy_name("production", &"a".repeat(121)));
    }
}
