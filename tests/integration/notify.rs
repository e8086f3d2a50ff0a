//! Notifications end to end: the real operator binary, real agents, the fake flyctl, and a local
//! HTTP receiver standing in for Slack and for a generic webhook, with a sink that is down and one
//! that answers too late. And the figure "webhook to first target deploying" through the binary.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::routing::post;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use sandbox_operator::api::{
    BundleTargetState, DeployPhase, Sandbox, SandboxDeploy, SandboxDeployStatus, SandboxPhase,
    SecretBundle, TargetPhase,
};
use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions};
use serde_json::{Value, json};

use crate::fleet::Agent;
use crate::support::{self, Operator};

const FAKE_FLYCTL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/fake-flyctl");

/// What the receiver got: (path, body), in arrival order.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, String)>>>);

impl Received {
    fn bodies(&self, path: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| b.clone())
            .collect()
    }

    fn all(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap().clone()
    }

    /// The generic webhook's bodies at `path`, parsed.
    fn json(&self, path: &str) -> Vec<Value> {
        self.bodies(path)
            .iter()
            .map(|b| serde_json::from_str(b).unwrap_or_else(|e| panic!("{e}: {b}")))
            .collect()
    }
}

/// A receiver on loopback: every path records the body and answers 200; `/slow` first waits
/// 4 s (longer than its sink's timeout).
async fn receiver() -> (SocketAddr, Received) {
    let got = Received::default();
    let app = axum::Router::new()
        .route(
            "/{path}",
            post(
                |State(g): State<Received>, Path(path): Path<String>, body: String| async move {
                    g.0.lock().unwrap().push((path.clone(), body));
                    if path == "slow" {
                        tokio::time::sleep(Duration::from_secs(4)).await;
                    }
                    "ok"
                },
            ),
        )
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, got)
}

/// A metric's value from the exposition text (0 when absent).
fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

struct Env {
    client: kube::Client,
    ns: String,
    ec2: Ec2Endpoint,
    sbx: Api<Sandbox>,
    deploys: Api<SandboxDeploy>,
    agents: BTreeMap<String, Agent>,
}

impl Env {
    async fn new(test: &str) -> Env {
        let client = support::client().await;
        let ns = support::namespace(&client, test).await;
        let ec2 = Ec2Endpoint::start(Ec2EndpointOptions::default())
            .await
            .unwrap();
        Env {
            sbx: Api::namespaced(client.clone(), &ns),
            deploys: Api::namespaced(client.clone(), &ns),
            client,
            ns,
            ec2,
            agents: BTreeMap::new(),
        }
    }

    async fn secret(&self, name: &str, data: Value) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let s: Secret =
            serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))
                .unwrap();
        api.create(&PostParams::default(), &s).await.unwrap();
    }

    /// Sandboxes labelled `group=<group>`, environment staging, each with its own agent at v1.
    async fn sandboxes(&mut self, group: &str, names: &[&str]) {
        let ami = self.ec2.defaults().await.unwrap().ami;
        for name in names {
            let agent = Agent::start("v1", 0).await;
            self.secret(&format!("{name}-token"), json!({"token": agent.token}))
                .await;
            let manifest = json!({
                "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "Sandbox",
                "metadata": {"name": name, "labels": {"group": group}},
                "spec": {
                    "environment": "staging", "instanceType": "t3.large", "launch": {"imageId": ami},
                    "agent": {"url": agent.url, "tokenSecretRef": {"name": format!("{name}-token"), "key": "token"}, "probeInterval": "1s", "timeout": "1s"},
                },
            });
            self.sbx
                .patch(
                    name,
                    &PatchParams::apply("gitops").force(),
                    &Patch::Apply(&manifest),
                )
                .await
                .unwrap();
            self.agents.insert(name.to_string(), agent);
        }
    }

    async fn wait_sandbox(
        &self,
        op: &Operator,
        name: &str,
        what: &str,
        f: impl Fn(&Sandbox) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = self.sbx.get(name).await.unwrap();
            if f(&s) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: timed out waiting for {what}: {:?}\n{}",
                s.status,
                op.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn deploy(&self, name: &str, tag: &str, group: &str, extra: Value) {
        let mut spec =
            json!({"image": {"tag": tag}, "selector": {"matchLabels": {"group": group}}});
        if let (Some(a), Value::Object(b)) = (spec.as_object_mut(), extra) {
            a.extend(b);
        }
        let d: SandboxDeploy = serde_json::from_value(json!({
            "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "SandboxDeploy",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap();
        self.deploys
            .create(&PostParams::default(), &d)
            .await
            .unwrap();
    }

    async fn wait_deploy(
        &self,
        op: &Operator,
        name: &str,
        what: &str,
        f: impl Fn(&SandboxDeployStatus) -> bool,
    ) -> SandboxDeployStatus {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let st = self
                .deploys
                .get(name)
                .await
                .unwrap()
                .status
                .unwrap_or_default();
            if f(&st) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: timed out waiting for {what}: {}\n{}",
                serde_json::to_string_pretty(&st).unwrap(),
                op.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn ready(s: &Sandbox) -> bool {
    s.status.as_ref().is_some_and(|st| {
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// One generic notice's identity: kind, name, event, target.
fn id(v: &Value) -> (String, String, String, String) {
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    (s("kind"), s("name"), s("event"), s("target"))
}

#[tokio::test]
async fn notifications_reach_slack_and_webhook_once_per_transition_and_a_dead_sink_blocks_nothing()
{
    let mut e = Env::new("notify").await;
    let ns = e.ns.clone();
    let (addr, got) = receiver().await;
    let down_port = sandbox_operator::testenv::free_port();
    let urls = [
        ("notify-slack", format!("http://{addr}/slack")),
        ("notify-hook", format!("http://{addr}/hook")),
        ("notify-slow", format!("http://{addr}/slow")),
        ("notify-tight", format!("http://{addr}/tight")),
        ("notify-down", format!("http://127.0.0.1:{down_port}/down")),
    ];
    for (name, url) in &urls {
        e.secret(name, json!({"url": url})).await;
    }
    let uniq = format!(
        "{:x}{:x}",
        std::process::id(),
        Timestamp::now().as_nanosecond()
    );
    let canary = format!("notifyCanary{uniq}");
    e.secret("src", json!({"API_KEY": canary})).await;
    e.secret(
        "fly",
        json!({"token": format!("FlyV1 fm2_TESTtoken{}AAAA+/==", std::process::id())}),
    )
    .await;
    let fly = tempfile::tempdir().unwrap();
    // flyctl fails, printing its input (the canary) back.
    std::fs::write(fly.path().join("fail"), "").unwrap();
    let fly_env = format!("FAKE_FLYCTL_DIR={}", fly.path().display());
    let dir = tempfile::tempdir().unwrap();
    let sink = |name: &str, type_: &str, extra: &str| {
        format!(
            "  - name: {name}\n    type: {type_}\n    urlSecretRef: {{namespace: {ns}, name: notify-{name}, key: url}}\n{extra}"
        )
    };
    let config = format!(
        "notifications:\n  dedupWindow: 10m\n  sinks:\n{}{}{}{}{}",
        sink(
            "slack",
            "slack",
            "    rateLimit: {burst: 50, perMinute: 60}\n"
        ),
        sink(
            "hook",
            "webhook",
            "    rateLimit: {burst: 50, perMinute: 60}\n"
        ),
        sink(
            "slow",
            "webhook",
            "    timeout: 1s\n    retries: 0\n    rateLimit: {burst: 50, perMinute: 60}\n"
        ),
        sink(
            "down",
            "webhook",
            "    timeout: 1s\n    retries: 1\n    rateLimit: {burst: 50, perMinute: 60}\n"
        ),
        sink(
            "tight",
            "webhook",
            "    events: [deploy_started, deploy_succeeded, deploy_halted, deploy_rolled_back]\n    rateLimit: {burst: 2, perMinute: 0}\n"
        ),
    );
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, config).unwrap();
    let args = [
        "--config",
        config_path.to_str().unwrap(),
        "--fly-method",
        "flyctl",
        "--flyctl",
        FAKE_FLYCTL,
        "--flyctl-env",
        &fly_env,
    ];
    let op = Operator::start(&ns, &e.ec2.url(), &args);

    e.sandboxes("g", &["s1", "s2"]).await;
    for n in ["s1", "s2"] {
        e.wait_sandbox(&op, n, "Ready", ready).await;
    }

    // A rollout that succeeds, past a sink that is down and one that answers too late.
    e.deploy(
        "ok-v2",
        "v2",
        "g",
        json!({"strategy": {"maxUnavailable": 2}}),
    )
    .await;
    e.wait_deploy(&op, "ok-v2", "Succeeded", |s| {
        s.phase == Some(DeployPhase::Succeeded)
    })
    .await;
    // One that fails on s1, is rolled back there and halts with s2 pending.
    e.agents["s1"].fail_health_for("v3");
    e.deploy(
        "bad-v3",
        "v3",
        "g",
        json!({"strategy": {"maxUnavailable": 1, "failurePolicy": "Halt", "autoRollback": true}}),
    )
    .await;
    let st = e
        .wait_deploy(&op, "bad-v3", "Failed", |s| {
            s.phase == Some(DeployPhase::Failed)
        })
        .await;
    assert_eq!(
        st.targets.iter().map(|t| t.phase).collect::<Vec<_>>(),
        [TargetPhase::RolledBack, TargetPhase::Pending]
    );
    // One waiting for approval.
    e.deploy("gate-v4", "v4", "g", json!({"paused": true}))
        .await;
    e.wait_deploy(&op, "gate-v4", "AwaitingApproval", |s| {
        s.phase == Some(DeployPhase::AwaitingApproval)
    })
    .await;
    // A secret bundle whose Fly.io target fails, echoing the canary.
    let bundles: Api<SecretBundle> = Api::namespaced(e.client.clone(), &ns);
    let b: SecretBundle = serde_json::from_value(json!({
        "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "SecretBundle", "metadata": {"name": "fly"},
        "spec": {
            "sources": [{"secretName": "src"}],
            "targets": {"flyApps": [{"app": "api", "tokenSecretRef": {"name": "fly", "key": "token"}}]},
        },
    }))
    .unwrap();
    bundles.create(&PostParams::default(), &b).await.unwrap();
    support::eventually(60, "the bundle's target failing", || async {
        let st = bundles.get("fly").await.ok()?.status?;
        st.targets
            .iter()
            .any(|t| t.state == BundleTargetState::Failed)
            .then_some(())
    })
    .await;
    // A sandbox whose agent stops answering.
    e.agents.get_mut("s2").unwrap().stop();
    e.wait_sandbox(&op, "s2", "Unhealthy", |s| {
        s.status.as_ref().and_then(|st| st.phase) == Some(SandboxPhase::Unhealthy)
    })
    .await;

    // A sandbox whose instance is terminated behind the operator's back: Failed.
    let instance = e
        .sbx
        .get("s1")
        .await
        .unwrap()
        .status
        .and_then(|s| s.instance)
        .map(|i| i.id)
        .expect("s1's instance id");
    e.ec2
        .client()
        .await
        .terminate_instances()
        .instance_ids(&instance)
        .send()
        .await
        .unwrap();
    e.wait_sandbox(&op, "s1", "Failed", |s| {
        s.status.as_ref().and_then(|st| st.phase) == Some(SandboxPhase::Failed)
    })
    .await;

    let expected: Vec<(&str, &str, &str, &str)> = vec![
        ("SandboxDeploy", "ok-v2", "deploy_started", ""),
        ("SandboxDeploy", "ok-v2", "deploy_succeeded", ""),
        ("SandboxDeploy", "bad-v3", "deploy_started", ""),
        ("SandboxDeploy", "bad-v3", "deploy_rolled_back", "s1"),
        ("SandboxDeploy", "bad-v3", "deploy_halted", ""),
        ("SandboxDeploy", "gate-v4", "deploy_awaiting_approval", ""),
        ("SecretBundle", "fly", "secret_sync_failed", ""),
        ("Sandbox", "s2", "sandbox_unhealthy", ""),
        ("Sandbox", "s1", "sandbox_failed", ""),
    ];
    let has_all = |v: &[Value]| {
        expected.iter().all(|(k, n, ev, t)| {
            v.iter()
                .any(|x| id(x) == (k.to_string(), n.to_string(), ev.to_string(), t.to_string()))
        })
    };
    let waited =
        support::try_eventually(30, || async { has_all(&got.json("hook")).then_some(()) }).await;
    if waited.is_none() {
        let v = got.json("hook");
        let missing: Vec<_> = expected
            .iter()
            .filter(|(k, n, ev, t)| {
                !v.iter()
                    .any(|x| id(x) == (k.to_string(), n.to_string(), ev.to_string(), t.to_string()))
            })
            .collect();
        let seen: Vec<_> = v.iter().map(id).collect();
        panic!("notifications missing at the webhook after 30 s: {missing:?}; seen: {seen:?}");
    }
    // The flyctl target keeps failing and being retried, the sandbox stays unhealthy: nothing
    // more is told of them.
    tokio::time::sleep(Duration::from_secs(5)).await;

    // ---- The generic webhook: exactly one notice per transition, with its fields. ----
    let hook = got.json("hook");
    let mut count: BTreeMap<(String, String, String, String), usize> = BTreeMap::new();
    for v in &hook {
        *count.entry(id(v)).or_default() += 1;
        assert_eq!(v["version"], 1, "{v}");
        assert_eq!(v["namespace"], ns.as_str(), "{v}");
        assert!(
            v["timestamp"]
                .as_str()
                .unwrap()
                .parse::<Timestamp>()
                .is_ok(),
            "{v}"
        );
        assert!(!v["reason"].as_str().unwrap().is_empty(), "{v}");
        assert!(!v["message"].as_str().unwrap().is_empty(), "{v}");
    }
    for ((k, n, ev, t), c) in &count {
        assert_eq!(*c, 1, "{k} {n} {ev} {t} told {c} times: {hook:#?}");
    }
    let find = |name: &str, event: &str| {
        hook.iter()
            .find(|v| v["name"] == name && v["event"] == event)
            .unwrap_or_else(|| panic!("no {event} for {name}: {hook:#?}"))
            .clone()
    };
    let halted = find("bad-v3", "deploy_halted");
    assert_eq!(halted["reason"], "Halted");
    assert_eq!(halted["severity"], "warning");
    assert_eq!(halted["details"]["tag"], "v3");
    assert_eq!(halted["details"]["failed"], 1);
    let rb = find("bad-v3", "deploy_rolled_back");
    assert!(
        rb["message"].as_str().unwrap().contains("set back to"),
        "{rb}"
    );
    let ok = find("ok-v2", "deploy_succeeded");
    assert_eq!(
        (ok["severity"].as_str(), ok["details"]["updated"].as_i64()),
        (Some("info"), Some(2))
    );
    let sick = find("s2", "sandbox_unhealthy");
    assert_eq!(sick["kind"], "Sandbox");
    let dead = find("s1", "sandbox_failed");
    assert_eq!(dead["reason"], "InstanceTerminated", "{dead}");
    assert_eq!(dead["details"]["instanceId"], instance.as_str(), "{dead}");
    let sync = find("fly", "secret_sync_failed");
    assert_eq!(sync["reason"], "SyncFailed");

    // ---- Slack: the same notices, as text. ----
    let slack = got.bodies("slack");
    assert_eq!(slack.len(), hook.len(), "{slack:#?}");
    for (k, n, ev, t) in &expected {
        let matching: Vec<&String> = slack
            .iter()
            .filter(|b| {
                let v: Value = serde_json::from_str(b).unwrap();
                let text = v["text"].as_str().unwrap_or_default();
                text.contains(&format!("{ns}/{n}"))
                    && text.ends_with(&format!("({ev})"))
                    && text.contains(t)
                    && v["blocks"][1]["elements"][0]["text"]
                        .as_str()
                        .is_some_and(|c| c.starts_with(k))
            })
            .collect();
        assert_eq!(matching.len(), 1, "{k} {n} {ev}: {slack:#?}");
    }

    // ---- The filtered, rate-limited sink: its two tokens, then nothing. ----
    let tight = got.json("tight");
    assert_eq!(
        tight.iter().map(id).collect::<Vec<_>>(),
        [
            (
                "SandboxDeploy".into(),
                "ok-v2".into(),
                "deploy_started".into(),
                "".into()
            ),
            (
                "SandboxDeploy".into(),
                "ok-v2".into(),
                "deploy_succeeded".into(),
                "".into()
            ),
        ],
        "{tight:#?}"
    );

    // ---- The sinks that are down or slow: counted and logged failures, nothing held up. ----
    let n = |m: &str, sink: &str, result: &str| {
        metric(
            m,
            &format!("sandbox_operator_notifications_total{{sink=\"{sink}\",result=\"{result}\"}}"),
        )
    };
    // The down and slow sinks work through their queues at their own pace (a second each).
    let told = hook.len() as f64;
    let m = support::eventually(
        60,
        "every notice counted as failed at the down and slow sinks",
        || async {
            let m = op.metrics().await;
            (n(&m, "down", "failed") == told && n(&m, "slow", "failed") == told).then_some(m)
        },
    )
    .await;
    assert_eq!(n(&m, "hook", "sent"), told, "{m}");
    assert_eq!(n(&m, "slack", "sent"), slack.len() as f64, "{m}");
    assert_eq!(n(&m, "down", "sent"), 0.0, "{m}");
    assert_eq!(n(&m, "slow", "sent"), 0.0, "{m}");
    assert_eq!(n(&m, "tight", "sent"), 2.0, "{m}");
    assert!(n(&m, "tight", "rate_limited") >= 3.0, "{m}");
    let logs = op.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("notification not delivered") && l.contains("down")),
        "no logged failure for the down sink"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("notification not delivered") && l.contains("slow")),
        "no logged failure for the slow sink"
    );
    for (name, url) in &urls {
        assert!(!logs.contains(url.as_str()), "{name}'s URL is in the log");
    }

    // ---- No body carries the canary, in any form. ----
    let places: Vec<(String, String)> = got
        .all()
        .into_iter()
        .map(|(p, b)| (format!("body at /{p}"), b))
        .collect();
    let leaks = support::find_leaks(&[("API_KEY", canary.clone())], &places);
    assert!(leaks.is_empty(), "{leaks:#?}");
    assert!(
        places
            .iter()
            .any(|(p, b)| p.contains("hook") && b.contains("secret_sync_failed")),
        "the canary check saw the sync failure"
    );

    // ---- A restart announces nothing again. ----
    let before = got.all().len();
    let op = op.restart(&ns, &e.ec2.url(), &args);
    support::eventually(60, "the restarted notifier recording the state", || async {
        (op.logs().matches("notifier watching").count() >= 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = got.all();
    assert_eq!(
        after.len(),
        before,
        "told again after a restart: {:#?}",
        &after[before..]
    );
}

fn sign(secret: &str, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The figure "webhook to first target deploying" through the real binary: a signed delivery
/// (seed 001's form, auto-deploy on) posted to the operator, timed until the SandboxDeploy shows
/// a target Deploying (or past it). Printed, not asserted: run with `--nocapture`.
#[tokio::test]
async fn figure_webhook_to_first_target_deploying() {
    let mut e = Env::new("notify-figure").await;
    let ns = e.ns.clone();
    let secret = "figure-shared-secret-0123456789";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), format!("{secret}\n")).unwrap();
    let config = format!(
        "webhook:\n  secretFile: {}\n  environments:\n    staging:\n      namespace: {ns}\n      selector: {{environment: staging}}\n      strategy: {{maxUnavailable: 1}}\n      autoDeploy: true\n",
        dir.path().join("secret").display()
    );
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, config).unwrap();
    let op = Operator::start(
        &ns,
        &e.ec2.url(),
        &["--config", config_path.to_str().unwrap()],
    );
    e.sandboxes("fig", &["f1", "f2"]).await;
    for n in ["f1", "f2"] {
        e.wait_sandbox(&op, n, "Ready", ready).await;
    }
    let http = reqwest::Client::new();
    let url = format!(
        "http://{}{}",
        op.http,
        sandbox_operator::operator::webhook::PATH
    );
    let mut times = Vec::new();
    let mut starts = Vec::new();
    for i in 0..11 {
        let tag = format!("fig{i}");
        let body = serde_json::to_vec(&json!({
            "image": format!("registry.example/ghosthands:{tag}"), "image_tag": tag,
            "commit_sha": format!("{tag}-sha"), "commit_message": "figure", "branch": "main",
            "repository": "org/repo", "run_id": format!("{i}"), "environment": "staging",
        }))
        .unwrap();
        let t0 = Instant::now();
        let r = http
            .post(&url)
            .header("content-type", "application/json")
            .header("x-gh-event", "deploy_ready")
            .header("x-gh-environment", "staging")
            .header("x-gh-webhook-signature", sign(secret, &body))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let answer: Value = r.json().await.unwrap();
        assert_eq!(status, 202, "{answer}");
        let name = answer["name"].as_str().unwrap().to_string();
        // Two moments: the first target started (Draining: the operator asked its agent) and
        // the first target Deploying (or past it: the agent reported the deploy under way).
        let mut started = None;
        let deploying = loop {
            let st = e
                .deploys
                .get_opt(&name)
                .await
                .unwrap()
                .and_then(|d| d.status)
                .unwrap_or_default();
            let past = |t: &sandbox_operator::api::DeployTarget| {
                matches!(
                    t.phase,
                    TargetPhase::Deploying | TargetPhase::Verifying | TargetPhase::Succeeded
                )
            };
            if started.is_none()
                && st
                    .targets
                    .iter()
                    .any(|t| t.phase == TargetPhase::Draining || past(t))
            {
                started = Some(t0.elapsed());
            }
            if st.targets.iter().any(past) {
                break t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "{name}: no target deploying: {st:?}\n{}",
                op.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        starts.push(started.unwrap_or(deploying));
        times.push(deploying);
        e.wait_deploy(&op, &name, "Succeeded", |s| {
            s.phase == Some(DeployPhase::Succeeded)
        })
        .await;
    }
    for (what, times) in [
        ("first target started (Draining)", &starts),
        ("first target deploying", &times),
    ] {
        let mut ms: Vec<u128> = times.iter().map(|d| d.as_millis()).collect();
        println!("webhook to {what} (ms), per delivery: {ms:?}");
        ms.sort();
        println!(
            "webhook to {what}: median {} ms, min {} ms, max {} ms over {} deliveries (2 sandboxes, maxUnavailable 1, --poll 500ms)",
            ms[ms.len() / 2],
            ms[0],
            ms[ms.len() - 1],
            ms.len()
        );
    }
}

/// A sink configuration the operator cannot use stops `run` at start, naming the field.
#[test]
fn a_bad_sink_config_stops_run_at_start_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (yaml, says) in [
        (
            "events: [deploy_exploded]",
            "notifications.sinks[0].events: unknown event \"deploy_exploded\"; the events are deploy_started,",
        ),
        (
            "rateLimit: {burst: 0}",
            "notifications.sinks[0].rateLimit.burst: must be at least 1",
        ),
        ("timeout: soon", "notifications.sinks[0].timeout"),
    ] {
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            format!(
                "notifications:\n  sinks:\n  - name: ops\n    type: slack\n    urlSecretRef: {{namespace: n, name: s, key: url}}\n    {yaml}\n"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox-operator"))
            .args(["run", "--http-addr", "127.0.0.1:0", "--config"])
            .arg(&path)
            .env("KUBECONFIG", dir.path().join("none"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{yaml}: {err}");
        assert!(err.contains(says), "{yaml}: {err}");
    }
}
