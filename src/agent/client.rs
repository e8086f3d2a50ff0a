//! The operator-side client of the agent: typed requests and answers, a timeout per call, and
//! errors whose kind tells a controller what to do (requeue, wait for an edit, report a
//! conflicting deploy, ...). It also speaks to the seeds' old `health-server.js` (only `/health`
//! and `/deploy` exist there; the other calls answer [`AgentError::NotSupported`]).

use crate::agent::protocol::{
    self, DeployAccepted, DeployRequest, DrainRequest, DrainResponse, ErrorBody, HealthReport,
    PutEnvRequest, PutEnvResponse, RestartRequest, RestartResponse,
};
use crate::redact::{Redaction, Redactor};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// What went wrong talking to an agent. Messages name the agent's URL and the call, never the
/// token or a request body.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The base URL is not a valid http(s) URL.
    #[error("invalid agent URL {url:?}: {message}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it is not valid.
        message: String,
    },
    /// No connection (refused, unreachable, DNS): the instance or the agent is down.
    #[error("agent {url} unreachable ({op}): {message}")]
    Connect {
        /// The agent's base URL.
        url: String,
        /// The call (`health`, `deploy`, `drain`, ...).
        op: &'static str,
        /// What went wrong, with the token masked.
        message: String,
    },
    /// The call took longer than its timeout.
    #[error("agent {url} did not answer {op} within {timeout:?}")]
    Timeout {
        /// The agent's base URL.
        url: String,
        /// The call (`health`, `deploy`, `drain`, ...).
        op: &'static str,
        /// The timeout that ran out.
        timeout: Duration,
    },
    /// 401: no token, or the wrong one.
    #[error("agent {url} refused the token ({op})")]
    Unauthorized {
        /// The agent's base URL.
        url: String,
        /// The call (`health`, `deploy`, `drain`, ...).
        op: &'static str,
    },
    /// 403: the service is not allow-listed on the agent.
    #[error("agent {url} forbids {op}: {message}")]
    Forbidden {
        /// The agent's base URL.
        url: String,
        /// The call (`health`, `deploy`, `drain`, ...).
        op: &'static str,
        /// What went wrong, with the token masked.
        message: String,
    },
    /// 409: a deploy is running (its id when the agent says), or the env file is busy.
    #[error("agent {url} is busy ({op}): {message}")]
    Conflict {
        /// The agent's base URL.
        url: String,
        /// The call (`health`, `deploy`, `drain`, ...).
        op: &'static str,
        /// The running deploy's id, when the agent named it.
        running_deploy_id: Option<String>,
        /// What went wrong, with the token masked.
        message: String,
    },
    /// 404 or 405 on a call the old health server does not have.
    #[error("agent {url} does not support {op} (old health server?)")]
    NotSupported {
        /// The agent's base URL.
        url: String,
        /// The call (`health`, `deploy`, `drain`, ...).
        op: &'static str,
    },
    /// Another 4xx: the request was wrong (bad tag, invalid env file, too large). Retrying the
    /// same request will not help.
    #[error("agent {url} rejected {op} with HTTP {status}: {message}")]
    Rejected {
        /// The agent's base URL.
        url: String,
        /// The call (`health`, `deploy`, `drain`, ...).
        op: &'static str,
        /// The HTTP status.
        status: u16,
        /// What went wrong, with the token masked.
        message: String,
    },
    /// 5xx: the agent or what it drives failed (worker unreachable, restart failed).
    #[error("agent {url} failed {op} with HTTP {status}: {message}")]
    Server {
        /// The agent's base URL.
        url: String,
        /// The call (`health`, `deploy`, `drain`, ...).
        op: &'static str,
        /// The HTTP status.
        status: u16,
        /// What went wrong, with the token masked.
        message: String,
    },
    /// The answer was not the expected JSON.
    #[error("agent {url} sent an answer to {op} that cannot be read: {message}")]
    Decode {
        /// The agent's base URL.
        url: String,
        /// The call (`health`, `deploy`, `drain`, ...).
        op: &'static str,
        /// What went wrong, with the token masked.
        message: String,
    },
    /// Any other transport failure.
    #[error("agent {url}: {op} failed: {message}")]
    Transport {
        /// The agent's base URL.
        url: String,
        /// The call (`health`, `deploy`, `drain`, ...).
        op: &'static str,
        /// What went wrong, with the token masked.
        message: String,
    },
}

impl AgentError {
    /// Worth retrying later with the same request (the agent was down, slow, busy or failing).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            AgentError::Connect { .. }
                | AgentError::Timeout { .. }
                | AgentError::Conflict { .. }
                | AgentError::Server { .. }
                | AgentError::Transport { .. }
        )
    }

    /// The agent could not be reached at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            AgentError::Connect { .. } | AgentError::Timeout { .. }
        )
    }

    /// The id of the deploy that is running, on a 409 from `/deploy`.
    pub fn running_deploy_id(&self) -> Option<&str> {
        match self {
            AgentError::Conflict {
                running_deploy_id, ..
            } => running_deploy_id.as_deref(),
            _ => None,
        }
    }

    /// The HTTP status, when the agent answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            AgentError::Unauthorized { .. } => Some(401),
            AgentError::Forbidden { .. } => Some(403),
            AgentError::Conflict { .. } => Some(409),
            AgentError::Rejected { status, .. } | AgentError::Server { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }
}

/// The bearer token. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentToken(String);

impl AgentToken {
    /// A token, with surrounding whitespace (a file's trailing newline) trimmed.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into().trim().to_string())
    }
    /// The secret itself (to put in a header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentToken(***)")
    }
}

impl fmt::Display for AgentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Timeouts per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting to the agent.
    pub connect: Duration,
    /// `GET /health`.
    pub health: Duration,
    /// `/deploy` answers at once; the deploy itself is followed through `/health`.
    pub deploy: Duration,
    /// `/drain` waits for the worker (the agent caps the wait at its drain timeout).
    pub drain: Duration,
    /// `POST /restart`.
    pub restart: Duration,
    /// `PUT /env` includes restarting the named services.
    pub put_env: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(3),
            health: Duration::from_secs(5),
            deploy: Duration::from_secs(10),
            drain: Duration::from_secs(75),
            restart: Duration::from_secs(100),
            put_env: Duration::from_secs(120),
        }
    }
}

/// A client for one agent. Every text it hands back (a deploy's and its steps' messages, check
/// messages, restart results, error messages) has the client's own token masked, and whatever
/// the redactor given to [`AgentClient::with_redactor`] knows: the agent masks what it prints,
/// and the operator masks it again where it enters.
#[derive(Clone)]
pub struct AgentClient {
    base: String,
    token: Option<AgentToken>,
    http: reqwest::Client,
    timeouts: Timeouts,
    /// The token's forms.
    own: Arc<Redaction>,
    redactor: Option<Redactor>,
}

impl fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentClient")
            .field("base", &self.base)
            .field("token", &self.token)
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

impl AgentClient {
    /// A client for the agent at `base_url` (e.g. `http://10.0.0.5:8000`).
    pub fn new(base_url: &str, token: Option<AgentToken>) -> Result<Self, AgentError> {
        Self::with_timeouts(base_url, token, Timeouts::default())
    }

    /// A client for the agent at `base_url` with these timeouts.
    pub fn with_timeouts(
        base_url: &str,
        token: Option<AgentToken>,
        timeouts: Timeouts,
    ) -> Result<Self, AgentError> {
        // Builds a shared client once; see [`AgentClient::with_http`] to share one across agents.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| AgentError::InvalidUrl {
                url: base_url.to_string(),
                message: format!("cannot build HTTP client: {e}"),
            })?;
        Self::with_http(http, base_url, token, timeouts)
    }

    /// A client that uses an existing `reqwest::Client` (its connection pool is shared).
    pub fn with_http(
        http: reqwest::Client,
        base_url: &str,
        token: Option<AgentToken>,
        timeouts: Timeouts,
    ) -> Result<Self, AgentError> {
        let url = reqwest::Url::parse(base_url).map_err(|e| AgentError::InvalidUrl {
            url: base_url.to_string(),
            message: e.to_string(),
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(AgentError::InvalidUrl {
                url: base_url.to_string(),
                message: "expected http(s)://host[:port]".into(),
            });
        }
        let own = Arc::new(Redaction::new([], token.as_ref().map(AgentToken::expose)));
        Ok(Self {
            base: base_url.trim_end_matches('/').to_string(),
            token,
            http,
            timeouts,
            own,
            redactor: None,
        })
    }

    /// Masks the secrets `redactor` knows (as it knows them at each call) in every text this
    /// client hands back: the operator's process-wide redactor, where an agent's text enters.
    pub fn with_redactor(mut self, redactor: Redactor) -> Self {
        self.redactor = Some(redactor);
        self
    }

    /// `text` with the token and the redactor's secrets masked.
    fn mask(&self, text: &mut String) {
        if !self.own.is_empty() {
            *text = self.own.redact(text);
        }
        if let Some(r) = &self.redactor {
            r.redact_in_place(text);
        }
    }

    /// The agent's base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The timeouts per call.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// `GET /health`. Works against the old health server too.
    pub async fn health(&self) -> Result<HealthReport, AgentError> {
        self.call::<(), _>(
            Method::GET,
            protocol::PATH_HEALTH,
            "health",
            None,
            self.timeouts.health,
        )
        .await
    }

    /// `POST /deploy`: starts a deploy of `tag`; follow it through [`HealthReport::deploy`].
    pub async fn deploy(&self, tag: &str) -> Result<DeployAccepted, AgentError> {
        let body = DeployRequest {
            image_tag: tag.to_string(),
        };
        self.call(
            Method::POST,
            protocol::PATH_DEPLOY,
            "deploy",
            Some(&body),
            self.timeouts.deploy,
        )
        .await
    }

    /// `POST /drain`, waiting (up to the agent's drain timeout) for the worker to be deploy-safe.
    pub async fn drain(&self) -> Result<DrainResponse, AgentError> {
        self.drain_with(&DrainRequest::default()).await
    }

    /// `POST /drain` with options (no wait, a shorter wait).
    pub async fn drain_with(&self, req: &DrainRequest) -> Result<DrainResponse, AgentError> {
        self.call(
            Method::POST,
            protocol::PATH_DRAIN,
            "drain",
            Some(req),
            self.timeouts.drain,
        )
        .await
    }

    /// `POST /restart` of an allow-listed service.
    pub async fn restart(&self, service: &str) -> Result<RestartResponse, AgentError> {
        let body = RestartRequest {
            service: service.to_string(),
        };
        self.call(
            Method::POST,
            protocol::PATH_RESTART,
            "restart",
            Some(&body),
            self.timeouts.restart,
        )
        .await
    }

    /// `PUT /env`: replaces the env file with `content` and restarts `services`.
    pub async fn put_env(
        &self,
        content: &str,
        services: &[String],
    ) -> Result<PutEnvResponse, AgentError> {
        let body = PutEnvRequest {
            content: content.to_string(),
            restart_services: services.to_vec(),
        };
        self.call(
            Method::PUT,
            protocol::PATH_ENV,
            "put_env",
            Some(&body),
            self.timeouts.put_env,
        )
        .await
    }

    async fn call<B: Serialize, T: DeserializeOwned + Masked>(
        &self,
        method: Method,
        path: &str,
        op: &'static str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<T, AgentError> {
        match self.call_raw::<B, T>(method, path, op, body, timeout).await {
            Ok(mut t) => {
                t.mask_with(&|m: &mut String| self.mask(m));
                Ok(t)
            }
            Err(mut e) => {
                e.mask_with(&|m: &mut String| self.mask(m));
                Err(e)
            }
        }
    }

    async fn call_raw<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        op: &'static str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<T, AgentError> {
        let url = self.base.clone();
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(timeout);
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t.expose());
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| transport_error(&e, &url, op, timeout))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| transport_error(&e, &url, op, timeout))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| AgentError::Decode {
                url,
                op,
                message: e.to_string(),
            });
        }
        let err: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
        let message = err
            .as_ref()
            .map(|e| e.message.clone())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| {
                status
                    .canonical_reason()
                    .unwrap_or("no message")
                    .to_string()
            });
        Err(match status {
            StatusCode::UNAUTHORIZED => AgentError::Unauthorized { url, op },
            StatusCode::FORBIDDEN => AgentError::Forbidden { url, op, message },
            StatusCode::CONFLICT => AgentError::Conflict {
                url,
                op,
                running_deploy_id: err.and_then(|e| e.deploy_id),
                message,
            },
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED if op != "health" => {
                AgentError::NotSupported { url, op }
            }
            StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => {
                AgentError::Timeout { url, op, timeout }
            }
            s if s.is_client_error() => AgentError::Rejected {
                url,
                op,
                status: s.as_u16(),
                message,
            },
            s => AgentError::Server {
                url,
                op,
                status: s.as_u16(),
                message,
            },
        })
    }
}

/// The free texts of an answer, for masking. Identifiers (tags, ids, hashes, step names) are
/// left alone: the operator compares them.
trait Masked {
    fn mask_with(&mut self, mask: &dyn Fn(&mut String));
}

impl Masked for HealthReport {
    fn mask_with(&mut self, mask: &dyn Fn(&mut String)) {
        if let Some(d) = &mut self.deploy {
            mask(&mut d.message);
            for s in &mut d.steps {
                mask(&mut s.message);
            }
        }
        for c in &mut self.checks {
            mask(&mut c.message);
        }
    }
}

impl Masked for DeployAccepted {
    fn mask_with(&mut self, mask: &dyn Fn(&mut String)) {
        mask(&mut self.message);
    }
}

impl Masked for DrainResponse {
    fn mask_with(&mut self, _: &dyn Fn(&mut String)) {}
}

impl Masked for RestartResponse {
    fn mask_with(&mut self, mask: &dyn Fn(&mut String)) {
        mask(&mut self.message);
    }
}

impl Masked for PutEnvResponse {
    fn mask_with(&mut self, mask: &dyn Fn(&mut String)) {
        for r in &mut self.restarted {
            r.mask_with(mask);
        }
    }
}

impl Masked for AgentError {
    fn mask_with(&mut self, mask: &dyn Fn(&mut String)) {
        match self {
            AgentError::InvalidUrl { message, .. }
            | AgentError::Connect { message, .. }
            | AgentError::Forbidden { message, .. }
            | AgentError::Conflict { message, .. }
            | AgentError::Rejected { message, .. }
            | AgentError::Server { message, .. }
            | AgentError::Decode { message, .. }
            | AgentError::Transport { message, .. } => mask(message),
            AgentError::Timeout { .. }
            | AgentError::Unauthorized { .. }
            | AgentError::NotSupported { .. } => {}
        }
    }
}

fn transport_error(
    e: &reqwest::Error,
    url: &str,
    op: &'static str,
    timeout: Duration,
) -> AgentError {
    let url = url.to_string();
    if e.is_timeout() {
        AgentError::Timeout { url, op, timeout }
    } else if e.is_connect() {
        AgentError::Connect {
            url,
            op,
            message: root_cause(e),
        }
    } else if e.is_decode() {
        AgentError::Decode {
            url,
            op,
            message: root_cause(e),
        }
    } else {
        AgentError::Transport {
            url,
            op,
            message: root_cause(e),
        }
    }
}

/// The innermost error's text (reqwest's own text repeats the URL).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_never_in_debug() {
        let c = AgentClient::new(
            "http://127.0.0.1:8000/",
            Some(AgentToken::new("super-secret-token-value")),
        )
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("super-secret"), "{dbg}");
        assert!(dbg.contains("AgentToken(***)"));
        assert_eq!(c.base_url(), "http://127.0.0.1:8000");
    }

    #[test]
    fn bad_urls() {
        assert!(matches!(
            AgentClient::new("not a url", None),
            Err(AgentError::InvalidUrl { .. })
        ));
        assert!(matches!(
            AgentClient::new("ftp://x", None),
            Err(AgentError::InvalidUrl { .. })
        ));
    }

    #[tokio::test]
    async fn agent_text_is_masked_where_it_enters() {
        use axum::routing::{get, post};
        let token = "client-token-0123456789abcdef";
        let secret = "pem-line-1\nsecond \"line\" $x";
        let printed = crate::agent::envfile::render_value(secret);
        let health = serde_json::json!({
            "status": "degraded",
            "imageTag": "v1.2.3",
            "checks": [{"name": "compose", "status": "fail", "message": format!("ps failed: K={printed}")}],
            "deploy": {
                "id": "d1", "tag": "v1.2.3", "state": "rolled_back", "step": "rollback_health_check",
                "message": format!("pull failed: {printed} {token}"), "startedAt": "2024-01-01T00:00:00Z",
                "steps": [{"name": "pull", "status": "failed", "message": format!("second \"line\" $x"), "startedAt": "2024-01-01T00:00:00Z"}],
            },
        });
        let conflict =
            serde_json::json!({"success": false, "message": format!("busy: {token} {printed}")});
        let app = axum::Router::new()
            .route("/health", get(move || async move { axum::Json(health) }))
            .route(
                "/deploy",
                post(move || async move { (reqwest::StatusCode::CONFLICT, axum::Json(conflict)) }),
            );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        let redactor = Redactor::default();
        redactor.set_values("bundle", [secret]);
        let c = AgentClient::new(&format!("http://{addr}"), Some(AgentToken::new(token)))
            .unwrap()
            .with_redactor(redactor);
        let h = c.health().await.unwrap();
        let d = h.deploy.as_ref().unwrap();
        let texts = [
            d.message.as_str(),
            d.steps[0].message.as_str(),
            h.checks[0].message.as_str(),
        ];
        for t in texts {
            assert!(t.contains(crate::redact::MASK), "{t}");
            assert!(!t.contains("line") && !t.contains(token), "{t}");
        }
        // Identifiers are left as they are.
        assert_eq!(
            (d.tag.as_str(), h.image_tag.as_deref()),
            ("v1.2.3", Some("v1.2.3"))
        );
        let e = c.deploy("v2").await.unwrap_err().to_string();
        assert!(
            e.contains("busy:") && !e.contains(token) && !e.contains("line"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn connect_errors_are_transient() {
        // A port nothing listens on: bind one, note it, drop it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let c = AgentClient::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
        let e = c.health().await.unwrap_err();
        assert!(e.is_unreachable() && e.is_transient(), "{e:?}");
    }
}
