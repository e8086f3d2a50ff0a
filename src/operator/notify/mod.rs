//! Notifications: telling people about rollouts, sick sandboxes and failed secret syncs, in the
//! chat and the tools they already watch (the seeds' admins were told by WebSocket broadcasts,
//! and the seeds list "no deploy notifications" among their gaps).
//!
//! A task of its own in the operator process (it runs where the controllers run, on the
//! leader): it watches SandboxDeploys, Sandboxes and SecretBundles itself, so no reconcile ever
//! waits for it, keeps the last [`decide::Observation`] of each object in memory and turns the
//! changes into [`decide::Notice`]s ([`decide::Memory`]). What it lists when it starts is
//! recorded, not told: a restart does not announce again what was already true. Each configured
//! sink (a Slack-compatible incoming webhook, or a generic JSON webhook) has a gate
//! ([`decide::SinkGate`]: event filter, duplicate window, token bucket) and a sender task fed by
//! a bounded queue (`try_send`: a full queue drops the notice and counts it). The sender reads
//! the sink's URL from its Secret at each delivery (the URL is a secret: it joins the process
//! redaction and is never logged), posts the body with a timeout, retries a bounded number of
//! times, and counts the result in `sandbox_operator_notifications_total{sink,result}`. Every
//! body passes the process redaction ([`crate::redact::process`]) just before it leaves.

pub mod decide;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::api::{Sandbox, SandboxDeploy, SecretBundle};
use crate::metrics::Metrics;
use crate::operator::webhook::SecretRef;
use decide::{Event, Kind, Memory, Notice, ObjectKey, Observation, SinkGate, TokenBucket, Verdict};

/// The `notifications:` key of the operator's config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NotificationsConfig {
    /// The same object and event are sent to a sink at most once per this window (default 5m).
    #[serde(default = "default_dedup_window")]
    pub dedup_window: String,
    /// How many notices may wait for each sink's sender (default 64); beyond, they are dropped
    /// and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Where notifications go.
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
}

fn default_dedup_window() -> String {
    "5m".into()
}
fn default_queue() -> usize {
    64
}

/// The kind of a sink.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum SinkType {
    /// A Slack-compatible incoming webhook: `{"text": ..., "blocks": [...]}`.
    Slack,
    /// A generic JSON webhook: the body documented in the README.
    Webhook,
}

/// One sink.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SinkConfig {
    /// Its name (the metric's `sink` label, logs): lower-case letters, digits and `-`.
    pub name: String,
    /// `slack` or `webhook`.
    #[serde(rename = "type")]
    pub type_: SinkType,
    /// The Secret key holding the URL (the URL is a secret: anyone holding it can post).
    pub url_secret_ref: SecretRef,
    /// The events it receives (default: all).
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// How long one delivery attempt may take (default 5s).
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// How many times a failed delivery is tried again, 1 s apart (default 1, at most 5).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The sink's token bucket.
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
}

fn default_timeout() -> String {
    "5s".into()
}
fn default_retries() -> u32 {
    1
}

/// A token bucket: `burst` notices at once, then `perMinute`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitConfig {
    /// The bucket's size (default 10).
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Its refill (default 20 a minute).
    #[serde(default = "default_per_minute")]
    pub per_minute: f64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            burst: default_burst(),
            per_minute: default_per_minute(),
        }
    }
}

fn default_burst() -> u32 {
    10
}
fn default_per_minute() -> f64 {
    20.0
}

/// One sink, checked.
#[derive(Clone, Debug)]
pub struct Sink {
    /// Its name.
    pub name: String,
    /// Its type.
    pub type_: SinkType,
    /// Where its URL is.
    pub url: SecretRef,
    /// The events it receives (None: all).
    pub events: Option<BTreeSet<Event>>,
    /// One attempt's timeout.
    pub timeout: Duration,
    /// Extra attempts.
    pub retries: u32,
    /// Bucket size.
    pub burst: u32,
    /// Refill per second.
    pub per_second: f64,
}

/// The notifier's settings, checked.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The duplicate window.
    pub dedup_window: Duration,
    /// Each sink's queue.
    pub queue: usize,
    /// The sinks.
    pub sinks: Vec<Sink>,
}

impl NotificationsConfig {
    /// Checks every field; the error names the one to fix.
    pub fn check(&self) -> Result<Settings, String> {
        let dedup_window = crate::util::parse_duration(&self.dedup_window)
            .map_err(|e| format!("notifications.dedupWindow: {e}"))?;
        if self.queue == 0 {
            return Err("notifications.queue: must be more than 0".into());
        }
        let mut names = BTreeSet::new();
        let mut sinks = Vec::new();
        for (i, s) in self.sinks.iter().enumerate() {
            let at = format!("notifications.sinks[{i}]");
            let valid = !s.name.is_empty()
                && s.name.len() <= 63
                && s.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !valid {
                return Err(format!(
                    "{at}.name: {:?} must be 1-63 lower-case letters, digits or '-'",
                    s.name
                ));
            }
            if !names.insert(s.name.clone()) {
                return Err(format!("{at}.name: {:?} is used twice", s.name));
            }
            let r = &s.url_secret_ref;
            if r.namespace.is_empty() || r.name.is_empty() || r.key.is_empty() {
                return Err(format!(
                    "{at}.urlSecretRef: namespace, name and key must all be set"
                ));
            }
            let events = match &s.events {
                None => None,
                Some(list) => Some(
                    list.iter()
                        .map(|e| Event::parse(e).map_err(|m| format!("{at}.events: {m}")))
                        .collect::<Result<BTreeSet<_>, _>>()?,
                ),
            };
            let timeout = crate::util::parse_duration(&s.timeout)
                .map_err(|e| format!("{at}.timeout: {e}"))?;
            if timeout.is_zero() {
                return Err(format!("{at}.timeout: must be more than 0s"));
            }
            if s.retries > 5 {
                return Err(format!("{at}.retries: at most 5, got {}", s.retries));
            }
            if s.rate_limit.burst == 0 {
                return Err(format!("{at}.rateLimit.burst: must be at least 1"));
            }
            if !(s.rate_limit.per_minute.is_finite() && s.rate_limit.per_minute >= 0.0) {
                return Err(format!(
                    "{at}.rateLimit.perMinute: must be a number of 0 or more"
                ));
            }
            sinks.push(Sink {
                name: s.name.clone(),
                type_: s.type_,
                url: r.clone(),
                events,
                timeout,
                retries: s.retries,
                burst: s.rate_limit.burst,
                per_second: s.rate_limit.per_minute / 60.0,
            });
        }
        Ok(Settings {
            dedup_window,
            queue: self.queue,
            sinks,
        })
    }
}

/// The redactor source a sink's URL is registered under.
fn redaction_source(sink: &str) -> String {
    format!("notify/{sink}")
}

/// One sink's sender: reads the URL, renders, posts.
struct Sender {
    sink: Sink,
    client: Client,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
}

impl Sender {
    /// The URL, from its Secret (registered with the process redaction before it is used).
    async fn url(&self) -> Result<String, String> {
        let r = &self.sink.url;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &r.namespace);
        let s = api
            .get(&r.name)
            .await
            .map_err(|e| format!("reading the URL Secret {}/{}: {e}", r.namespace, r.name))?;
        let v = s.data.and_then(|d| d.get(&r.key).cloned()).ok_or_else(|| {
            format!(
                "the URL Secret {}/{} has no key {}",
                r.namespace, r.name, r.key
            )
        })?;
        let url = String::from_utf8_lossy(&v.0).trim().to_string();
        crate::redact::process().set_values(&redaction_source(&self.sink.name), [url.clone()]);
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(format!(
                "the URL in Secret {}/{} key {} is not an http(s) URL",
                r.namespace, r.name, r.key
            ));
        }
        Ok(url)
    }

    async fn attempt(&self, body: &str) -> Result<(), String> {
        let url = self.url().await?;
        let r = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(self.sink.timeout)
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    format!("no answer within {:?}", self.sink.timeout)
                } else {
                    describe(e)
                }
            })?;
        let status = r.status();
        if status.is_success() {
            return Ok(());
        }
        // A bounded excerpt of the answer: a receiver's error says what it disliked.
        let text = tokio::time::timeout(self.sink.timeout, r.text())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let excerpt: String = text.chars().take(200).collect();
        Err(format!("answered {status}: {excerpt}"))
    }

    async fn deliver(&self, n: &Notice) {
        let body = {
            let redaction = crate::redact::process().current();
            match self.sink.type_ {
                SinkType::Slack => decide::slack_body(n, &redaction),
                SinkType::Webhook => decide::webhook_body(n, &redaction),
            }
        };
        let mut tries = 0;
        let result = loop {
            match self.attempt(&body).await {
                Ok(()) => break Ok(()),
                Err(e) if tries >= self.sink.retries => break Err(e),
                Err(e) => {
                    debug!(sink = %self.sink.name, error = %crate::redact::process().redact(&e), "notification delivery failed; trying again");
                    tries += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        match result {
            Ok(()) => {
                self.metrics.notified(&self.sink.name, "sent");
                debug!(sink = %self.sink.name, event = n.event.as_str(), object = %n.dedup_key(), "notification sent");
            }
            Err(e) => {
                self.metrics.notified(&self.sink.name, "failed");
                warn!(
                    sink = %self.sink.name,
                    event = n.event.as_str(),
                    kind = n.object.kind.as_str(),
                    namespace = %n.object.namespace,
                    name = %n.object.name,
                    attempts = tries + 1,
                    error = %crate::redact::process().redact(&e),
                    "notification not delivered"
                );
            }
        }
    }
}

/// A request's error and its causes, without the URL (the caller masks what is left).
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// One sink as the watcher side sees it: its gate and its sender's queue.
struct Outlet {
    name: String,
    gate: SinkGate,
    queue: tokio::sync::mpsc::Sender<Notice>,
}

impl Outlet {
    /// Passes `n` through the gate into the sender's queue, without ever waiting: what does not
    /// go is counted (and a full queue logged). Returns the outcome (`queued` or the metric's
    /// result; `filtered` is not counted).
    fn offer(&mut self, n: &Notice, now: Timestamp, metrics: &Metrics) -> &'static str {
        let verdict = self.gate.verdict(n, now);
        if let Some(result) = verdict.result() {
            metrics.notified(&self.name, result);
            debug!(sink = %self.name, event = n.event.as_str(), object = %n.dedup_key(), result, "notification not sent");
            return result;
        }
        if verdict != Verdict::Send {
            return "filtered";
        }
        match self.queue.try_send(n.clone()) {
            Ok(()) => "queued",
            Err(_) => {
                metrics.notified(&self.name, "dropped");
                warn!(sink = %self.name, event = n.event.as_str(), object = %n.dedup_key(), "notification dropped: the sink's queue is full (it is slow or down)");
                "dropped"
            }
        }
    }
}

/// What the three watches say, as one stream.
enum Seen {
    Init(Kind),
    Listed(ObjectKey, Observation),
    Done(Kind),
    Changed(ObjectKey, Observation),
    Deleted(ObjectKey),
}

fn key_of<K: ResourceExt>(kind: Kind, o: &K) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: o.namespace().unwrap_or_default(),
        name: o.name_any(),
    }
}

fn watch<K>(
    client: &Client,
    namespace: Option<&str>,
    kind: Kind,
    observe: fn(&K) -> Observation,
) -> impl futures::Stream<Item = Seen> + Send + 'static
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .map_err(move |e| {
            debug!(kind = kind.as_str(), error = %e, "notifier watch error; it retries");
            e
        })
        .filter_map(move |ev| async move {
            let ev = ev.ok()?;
            Some(match ev {
                watcher::Event::Init => Seen::Init(kind),
                watcher::Event::InitApply(o) => Seen::Listed(key_of(kind, &o), observe(&o)),
                watcher::Event::InitDone => Seen::Done(kind),
                watcher::Event::Apply(o) => Seen::Changed(key_of(kind, &o), observe(&o)),
                watcher::Event::Delete(o) => Seen::Deleted(key_of(kind, &o)),
            })
        })
}

/// Runs the notifier until `shutdown` completes.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    if settings.sinks.is_empty() {
        return;
    }
    let http = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .build()
    {
        Ok(h) => h,
        Err(e) => {
            warn!(error = %e, "notifications off: could not build the HTTP client");
            return;
        }
    };
    let mut outlets = Vec::new();
    let mut senders = Vec::new();
    for sink in &settings.sinks {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Notice>(settings.queue);
        let sender = Sender {
            sink: sink.clone(),
            client: client.clone(),
            http: http.clone(),
            metrics: metrics.clone(),
        };
        senders.push(tokio::spawn(async move {
            while let Some(n) = rx.recv().await {
                sender.deliver(&n).await;
            }
        }));
        outlets.push(Outlet {
            name: sink.name.clone(),
            gate: SinkGate::new(
                sink.events.clone(),
                settings.dedup_window,
                TokenBucket::new(sink.burst, sink.per_second),
            ),
            queue: tx,
        });
    }
    info!(
        sinks = %settings.sinks.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(","),
        "notifier starting"
    );
    let ns = namespace.as_deref();
    let mut events = futures::stream::select_all([
        watch::<SandboxDeploy>(&client, ns, Kind::SandboxDeploy, decide::observe_deploy).boxed(),
        watch::<Sandbox>(&client, ns, Kind::Sandbox, decide::observe_sandbox).boxed(),
        watch::<SecretBundle>(&client, ns, Kind::SecretBundle, decide::observe_bundle).boxed(),
    ]);
    let mut memory = Memory::default();
    let mut listed_once = BTreeSet::new();
    tokio::pin!(shutdown);
    loop {
        let seen = tokio::select! {
            _ = &mut shutdown => break,
            s = events.next() => match s {
                Some(s) => s,
                None => break,
            },
        };
        let now = Timestamp::now();
        let notices = match seen {
            Seen::Init(kind) => {
                memory.list_started(kind);
                Vec::new()
            }
            Seen::Listed(key, o) => memory.listed(key, o, now),
            Seen::Done(kind) => {
                memory.list_done(kind);
                if listed_once.insert(kind) && listed_once.len() == 3 {
                    info!(
                        objects = memory.len(),
                        "notifier watching: the current state is recorded, changes from now on are told"
                    );
                }
                Vec::new()
            }
            Seen::Changed(key, o) => memory.changed(key, o, now),
            Seen::Deleted(key) => {
                memory.deleted(&key);
                Vec::new()
            }
        };
        for n in notices {
            debug!(event = n.event.as_str(), object = %n.dedup_key(), "notice");
            for o in outlets.iter_mut() {
                o.offer(&n, now, &metrics);
            }
        }
    }
    drop(outlets);
    for s in senders {
        s.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Result<Settings, String> {
        serde_yaml::from_str::<NotificationsConfig>(yaml)
            .map_err(|e| e.to_string())?
            .check()
    }

    #[test]
    fn a_sink_config_is_checked_field_by_field() {
        let ok = "sinks:\n- name: ops\n  type: slack\n  urlSecretRef: {namespace: n, name: s, key: url}\n  events: [deploy_failed, sandbox_unhealthy]\n  rateLimit: {burst: 3, perMinute: 6}\n";
        let s = config(ok).unwrap();
        assert_eq!(s.dedup_window, Duration::from_secs(300));
        assert_eq!(s.sinks[0].type_, SinkType::Slack);
        assert_eq!(s.sinks[0].timeout, Duration::from_secs(5));
        assert_eq!(s.sinks[0].retries, 1);
        assert_eq!(s.sinks[0].burst, 3);
        assert!((s.sinks[0].per_second - 0.1).abs() < 1e-9);
        assert_eq!(
            s.sinks[0].events,
            Some([Event::DeployFailed, Event::SandboxUnhealthy].into())
        );
        for (bad, says) in [
            (
                ok.replace("deploy_failed", "deploy_boom"),
                "sinks[0].events: unknown event \"deploy_boom\"",
            ),
            (ok.replace("name: ops", "name: Ops"), "sinks[0].name"),
            (
                ok.replace("burst: 3", "burst: 0"),
                "sinks[0].rateLimit.burst",
            ),
            (ok.replace("key: url", "key: ''"), "sinks[0].urlSecretRef"),
            (
                format!("dedupWindow: soon\n{ok}"),
                "notifications.dedupWindow",
            ),
            (
                ok.replace("  events:", "  timeout: 0s\n  events:"),
                "sinks[0].timeout",
            ),
            (
                format!(
                    "{ok}- name: ops\n  type: webhook\n  urlSecretRef: {{namespace: n, name: s, key: url}}\n"
                ),
                "sinks[1].name: \"ops\" is used twice",
            ),
        ] {
            let e = config(&bad).unwrap_err();
            assert!(e.contains(says), "{bad}\n=> {e}");
        }
        assert!(config(&ok.replace("type: slack", "type: teams")).is_err());
    }

    #[test]
    fn an_outlet_never_waits_for_a_full_queue_and_counts_what_it_drops() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let mut o = Outlet {
            name: "ops".into(),
            gate: SinkGate::new(
                Some([Event::DeployFailed, Event::SandboxUnhealthy].into()),
                Duration::from_secs(60),
                TokenBucket::new(10, 1.0),
            ),
            queue: tx,
        };
        let metrics = Metrics::new();
        let now: Timestamp = "2026-03-01T12:00:00Z".parse().unwrap();
        let n = |name: &str, event| Notice {
            object: ObjectKey {
                kind: Kind::SandboxDeploy,
                namespace: "fleet".into(),
                name: name.into(),
            },
            event,
            target: None,
            reason: "R".into(),
            message: "m".into(),
            at: now,
            details: Default::default(),
        };
        assert_eq!(
            o.offer(&n("a", Event::DeployFailed), now, &metrics),
            "queued"
        );
        // The sender has not taken it yet: the next one is dropped at once, not waited for.
        assert_eq!(
            o.offer(&n("b", Event::DeployFailed), now, &metrics),
            "dropped"
        );
        assert_eq!(
            o.offer(&n("a", Event::DeployFailed), now, &metrics),
            "deduplicated"
        );
        assert_eq!(
            o.offer(&n("c", Event::DeploySucceeded), now, &metrics),
            "filtered"
        );
        assert_eq!(rx.try_recv().unwrap().object.name, "a");
        assert_eq!(
            o.offer(&n("d", Event::SandboxUnhealthy), now, &metrics),
            "queued"
        );
        let text = metrics.encode();
        for line in [
            "sandbox_operator_notifications_total{sink=\"ops\",result=\"dropped\"} 1",
            "sandbox_operator_notifications_total{sink=\"ops\",result=\"deduplicated\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
    }
}
