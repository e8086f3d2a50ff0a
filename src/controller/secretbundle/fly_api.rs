//! Fly.io's Machines API, the edge: the two calls the `Api` method makes (list an app's
//! secrets, update them), over rustls. What the requests and answers are, and what they mean,
//! is decided in [`super::fly::api`].
//!
//! The token travels only in the `Authorization` header; values only in the update's body.
//! Neither is logged: requests are logged by method, path and status, and every text from Fly
//! is scrubbed before it reaches a message.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, RETRY_AFTER};
use tracing::debug;

use super::decide::{Content, FlyVisit, Outcome};
use super::fly::api::{self, Failure, Problem, SecretList};
use super::scrub::Scrubber;

/// Operator-wide settings of the Fly.io Machines API.
#[derive(Clone, Debug)]
pub struct FlyApiSettings {
    /// The base URL (`https://api.machines.dev`; a stand-in in tests).
    pub url: String,
    /// How long one call may take.
    pub timeout: Duration,
}

impl Default for FlyApiSettings {
    fn default() -> Self {
        Self {
            url: api::DEFAULT_URL.into(),
            timeout: Duration::from_secs(30),
        }
    }
}

/// One app, one token.
pub struct FlyApi<'a> {
    http: &'a reqwest::Client,
    settings: &'a FlyApiSettings,
    app: &'a str,
    token: &'a str,
}

impl<'a> FlyApi<'a> {
    /// A client for `app`.
    pub fn new(
        http: &'a reqwest::Client,
        settings: &'a FlyApiSettings,
        app: &'a str,
        token: &'a str,
    ) -> Self {
        Self {
            http,
            settings,
            app,
            token,
        }
    }

    fn url(&self) -> String {
        format!(
            "{}/v1/apps/{}/secrets",
            self.settings.url.trim_end_matches('/'),
            self.app
        )
    }

    /// `Authorization: Bearer <token>`, the token as stored (a `FlyV1 fm2_...` token
    /// included), as "Working with the Machines API" shows it.
    fn auth(&self) -> reqwest::header::HeaderValue {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", self.token))
            .unwrap_or_else(|_| reqwest::header::HeaderValue::from_static("Bearer"));
        // Kept out of reqwest's and hyper's Debug output.
        v.set_sensitive(true);
        v
    }

    /// `GET /v1/apps/{app}/secrets`.
    pub async fn list(&self, scrubber: &Scrubber) -> Result<SecretList, Failure> {
        let req = self
            .http
            .get(self.url())
            .header(AUTHORIZATION, self.auth())
            .timeout(self.settings.timeout);
        self.send("GET", req, scrubber).await
    }

    /// `POST /v1/apps/{app}/secrets` with every value of `values` (when `set`) and null for each
    /// key of `unset`.
    pub async fn update(
        &self,
        values: &BTreeMap<String, String>,
        set: bool,
        unset: &[String],
        scrubber: &Scrubber,
    ) -> Result<SecretList, Failure> {
        let body = api::update_body(values, set, unset);
        let req = self
            .http
            .post(self.url())
            .header(AUTHORIZATION, self.auth())
            .json(&body)
            .timeout(self.settings.timeout);
        drop(body);
        self.send("POST", req, scrubber).await
    }

    async fn send(
        &self,
        method: &str,
        req: reqwest::RequestBuilder,
        scrubber: &Scrubber,
    ) -> Result<SecretList, Failure> {
        let unreachable = |said: String| Failure {
            problem: Problem::Unreachable,
            status: 0,
            said,
            retry_after: None,
        };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                // reqwest's error names the URL (app name only) and the cause; scrubbed anyway.
                let what = if e.is_timeout() {
                    format!("no answer within {:?}", self.settings.timeout)
                } else {
                    chain(&e)
                };
                debug!(app = %self.app, %method, "Fly.io API call failed before an answer");
                return Err(unreachable(scrubber.scrub(&what)));
            }
        };
        let status = resp.status();
        debug!(app = %self.app, %method, status = status.as_u16(), "Fly.io API /v1/apps/{{app}}/secrets");
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            let mut f = api::classify(status.as_u16(), &text, retry_after.as_deref());
            f.said = scrubber.scrub(&f.said);
            return Err(f);
        }
        serde_json::from_str::<SecretList>(&text).map_err(|e| {
            unreachable(format!(
                "the answer ({status}) is not the documented JSON: {e}"
            ))
        })
    }
}

/// An error and its sources, joined.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// A visit through Fly's Machines API for the bundle `object` (namespace/name): list the app's
/// secrets, decide ([`api::visit`]), set and unset in one update when needed, and report what
/// the app's digests are now. Every text from Fly is scrubbed.
#[allow(clippy::too_many_arguments)]
pub async fn push(
    http: &reqwest::Client,
    settings: &FlyApiSettings,
    object: &str,
    app: &str,
    token: &str,
    known: &api::Known,
    content: &Content,
    scrubber: &Scrubber,
) -> Outcome {
    let client = FlyApi::new(http, settings, app, token);
    let failed = |f: api::Failure| Outcome::FlyFailed {
        message: api::message(app, &f),
        reason: f.problem.reason().to_string(),
        retry_after: f.retry_after,
        skip: f.problem == api::Problem::AppNotFound,
    };
    let listed = match client.list(scrubber).await {
        Ok(l) => l,
        Err(f) => return failed(f),
    };
    let vars = &content.vars;
    let v = api::visit(vars.keys(), known, &listed.secrets);
    let after = if v.set || !v.unset.is_empty() {
        debug!(bundle = %object, app = %app, set = v.set, unset = ?v.unset, drifted = ?v.drifted, "Fly.io API: updating the app's secrets");
        match client.update(vars, v.set, &v.unset, scrubber).await {
            Err(f) => return failed(f),
            // The update answers the secrets with their new digests; list when it did not.
            Ok(u) if vars.keys().all(|k| u.secrets.iter().any(|s| &s.name == k)) => u,
            Ok(_) => match client.list(scrubber).await {
                Ok(l) => l,
                Err(f) => return failed(f),
            },
        }
    } else {
        listed
    };
    let digests: BTreeMap<String, String> = after
        .secrets
        .iter()
        .filter(|s| vars.contains_key(&s.name))
        .map(|s| (s.name.clone(), s.digest.clone().unwrap_or_default()))
        .collect();
    if let Some(k) = vars.keys().find(|k| !digests.contains_key(*k)) {
        return Outcome::FlyFailed {
            message: format!(
                "Fly.io app {app} does not list key {k} after it was set; retried with backoff"
            ),
            reason: api::Problem::Unreachable.reason().to_string(),
            retry_after: None,
            skip: false,
        };
    }
    Outcome::Staged {
        hash: content.hash.clone(),
        fly: FlyVisit {
            managed_keys: vars.keys().cloned().collect(),
            fingerprint: api::fingerprint(vars.keys(), &after.secrets),
            digests,
            drifted: v.drifted,
            drift_unnamed: v.drift_unnamed,
            unset: v.unset,
            set: v.set,
        },
    }
}
