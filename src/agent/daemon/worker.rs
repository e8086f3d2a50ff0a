//! Talking to the worker (its status, drain and health endpoints) and to AdsPower's local API.

use serde_json::Value;
use std::time::Duration;

/// What the worker says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Jobs the worker runs now, when it said.
    pub active_workers: Option<u32>,
    /// Whether the worker may be stopped for a deploy now.
    pub deploy_safe: bool,
}

/// Reads the worker's status JSON. Accepts the spellings the GhostHands worker and its
/// neighbours use: `activeWorkers`, `active_workers`, `activeJobs`, `active_jobs`, `active`
/// (a number) and `deploy_safe`/`deploySafe` (a boolean; when absent, no active jobs means safe).
pub fn parse_status(v: &Value) -> Option<WorkerStatus> {
    let obj = v.as_object()?;
    let active = [
        "activeWorkers",
        "active_workers",
        "activeJobs",
        "active_jobs",
        "active",
    ]
    .iter()
    .find_map(|k| obj.get(*k).and_then(Value::as_u64))
    .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    let safe = ["deploy_safe", "deploySafe"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_bool));
    if active.is_none() && safe.is_none() {
        return None;
    }
    Some(WorkerStatus {
        active_workers: active,
        deploy_safe: safe.unwrap_or(active == Some(0)),
    })
}

/// A worker endpoint did not give a usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerError {
    /// Nothing listens there (connection refused): the worker is not running.
    pub unreachable: bool,
    /// What went wrong, in words.
    pub message: String,
}

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl WorkerError {
    fn answered(message: String) -> Self {
        Self {
            unreachable: false,
            message,
        }
    }
    fn from_reqwest(e: &reqwest::Error) -> Self {
        Self {
            unreachable: e.is_connect() && !e.is_timeout(),
            message: describe_reqwest(e),
        }
    }
}

/// `GET status_url`.
pub async fn fetch_status(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<WorkerStatus, WorkerError> {
    let resp = http
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| WorkerError::from_reqwest(&e))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(WorkerError::answered(format!(
            "worker status answered HTTP {}",
            status.as_u16()
        )));
    }
    let v: Value = resp
        .json()
        .await
        .map_err(|_| WorkerError::answered("worker status is not JSON".into()))?;
    parse_status(&v).ok_or_else(|| {
        WorkerError::answered(
            "worker status JSON has neither an active job count nor deploy_safe".into(),
        )
    })
}

/// `POST drain_url`.
pub async fn request_drain(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<(), WorkerError> {
    let resp = http
        .post(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| WorkerError::from_reqwest(&e))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(WorkerError::answered(format!(
            "drain answered HTTP {}",
            resp.status().as_u16()
        )))
    }
}

/// `GET health_url`: Ok on 2xx.
pub async fn check_health(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<(), String> {
    let resp = http
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| describe_reqwest(&e))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", resp.status().as_u16()))
    }
}

/// What AdsPower's local API says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdsPowerState {
    /// `/status` answered with `code: 0`.
    pub api_ok: bool,
    /// Browsers open, from `/api/v1/browser/local-active` when it answers.
    pub active_profiles: Option<u32>,
}

/// Asks AdsPower's local API for its status and open browsers.
pub async fn fetch_adspower(
    http: &reqwest::Client,
    base: &str,
    api_key: Option<&str>,
    timeout: Duration,
) -> Result<AdsPowerState, String> {
    let base = base.trim_end_matches('/');
    let get = |path: &str| {
        let mut rb = http.get(format!("{base}{path}")).timeout(timeout);
        if let Some(k) = api_key {
            rb = rb.bearer_auth(k);
        }
        rb
    };
    let resp = get("/status")
        .send()
        .await
        .map_err(|e| describe_reqwest(&e))?;
    if !resp.status().is_success() {
        return Err(format!(
            "AdsPower API answered HTTP {}",
            resp.status().as_u16()
        ));
    }
    let v: Value = resp
        .json()
        .await
        .map_err(|_| "AdsPower API status is not JSON".to_string())?;
    let api_ok = v.get("code").and_then(Value::as_i64) == Some(0);
    let mut active_profiles = None;
    if api_ok
        && let Ok(r) = get("/api/v1/browser/local-active").send().await
        && r.status().is_success()
        && let Ok(v) = r.json::<Value>().await
    {
        active_profiles = parse_local_active(&v);
    }
    Ok(AdsPowerState {
        api_ok,
        active_profiles,
    })
}

/// `{"code":0,"data":{"list":[...]}}` → the list's length.
pub fn parse_local_active(v: &Value) -> Option<u32> {
    if v.get("code").and_then(Value::as_i64) != Some(0) {
        return None;
    }
    let list = v.get("data")?.get("list")?.as_array()?;
    u32::try_from(list.len()).ok()
}

/// A reqwest error in a few words, without the URL's query or any body.
pub fn describe_reqwest(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection refused or unreachable".to_string()
    } else if e.is_decode() || e.is_body() {
        "bad response body".to_string()
    } else {
        "request failed".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_spellings() {
        let s = parse_status(&json!({"activeWorkers": 2, "deploy_safe": false})).unwrap();
        assert_eq!((s.active_workers, s.deploy_safe), (Some(2), false));
        let s = parse_status(&json!({"active_jobs": 0})).unwrap();
        assert_eq!((s.active_workers, s.deploy_safe), (Some(0), true));
        let s = parse_status(&json!({"deploySafe": true})).unwrap();
        assert_eq!((s.active_workers, s.deploy_safe), (None, true));
        assert!(parse_status(&json!({"x": 1})).is_none());
        assert!(parse_status(&json!([1])).is_none());
    }

    #[test]
    fn local_active() {
        assert_eq!(
            parse_local_active(
                &json!({"code":0,"data":{"list":[{"user_id":"a"},{"user_id":"b"}]}})
            ),
            Some(2)
        );
        assert_eq!(parse_local_active(&json!({"code":-1,"msg":"x"})), None);
    }
}
