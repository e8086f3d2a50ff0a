//! The SecretBundle controller, run in this test process against the shared control plane, real
//! `sandbox-agent` processes and the fake `flyctl` (tests/tools/fake-flyctl).
//!
//! The Sandbox controller (which fills a Sandbox's status from EC2 and from the agent's `/health`)
//! is not running here: each test creates adopted, ObserveOnly Sandboxes and writes their status
//! itself through the status subresource, playing the Sandbox controller's part: the instance
//! state (running or stopped), the agent URL, and, through [`StandIn`], the env hash the agent
//! reports on `/health`, copied into `status.agent.envSha256` with `lastSeen` as the Sandbox
//! controller's probes do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Event, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use sandbox_operator::agent::envfile;
use sandbox_operator::api::{
    BundleTargetKind, BundleTargetState, BundleTargetStatus, Sandbox, SecretBundle,
    SecretBundleStatus,
};
use sandbox_operator::controller::secretbundle::{self, ControllerSettings, decide, fly};
use sandbox_operator::metrics::Metrics;
use serde_json::json;

use crate::fleet::Agent;
use crate::support;

const FAKE_FLYCTL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/fake-flyctl");

struct Env {
    client: kube::Client,
    ns: String,
    bundles: Api<SecretBundle>,
    sbx: Api<Sandbox>,
    secrets: Api<Secret>,
    fly: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// A namespace, and the controller running in process for it.
async fn env(test: &str, tweak: impl FnOnce(&mut ControllerSettings)) -> Env {
    let client = support::client().await;
    let ns = support::namespace(&client, test).await;
    let fly = tempfile::tempdir().unwrap();
    let mut settings = ControllerSettings {
        flyctl: PathBuf::from(FAKE_FLYCTL),
        flyctl_env: vec![("FAKE_FLYCTL_DIR".into(), fly.path().display().to_string())],
        flyctl_timeout: Duration::from_secs(20),
        put_env_timeout: Duration::from_secs(20),
        decide: decide::Settings {
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(8),
        },
        progress_interval: Duration::from_millis(500),
        ..ControllerSettings::default()
    };
    tweak(&mut settings);
    let ctx = secretbundle::Context::new(client.clone(), Arc::new(Metrics::new()), settings);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(secretbundle::run(ctx, Some(ns.clone()), async move {
        let _ = rx.await;
    }));
    Env {
        bundles: Api::namespaced(client.clone(), &ns),
        sbx: Api::namespaced(client.clone(), &ns),
        secrets: Api::namespaced(client.clone(), &ns),
        client,
        ns,
        fly,
        _stop: tx,
    }
}

fn now_rfc3339() -> String {
    Timestamp::from_second(Timestamp::now().as_second())
        .unwrap()
        .to_string()
}

impl Env {
    /// Creates or replaces a Secret with these keys and values.
    async fn secret(&self, name: &str, kv: &[(&str, &str)]) {
        let data: BTreeMap<String, ByteString> = kv
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect();
        let s = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        };
        self.secrets
            .patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&s))
            .await
            .unwrap_or_else(|e| panic!("applying Secret {name}: {e}"));
    }

    /// The Secret holding the agents' bearer token (every test agent has the same one).
    async fn agent_token(&self, agent: &Agent) {
        self.secret("agent-token", &[("token", &agent.token)]).await;
    }

    /// An adopted, ObserveOnly Sandbox whose agent is `agent_url`.
    async fn sandbox(&self, name: &str, labels: &[(&str, &str)], agent_url: &str) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let obj = json!({
            "apiVersion": "fleet.valet.dev/v1alpha1",
            "kind": "Sandbox",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "environment": "staging",
                "instanceId": "i-0123456789abcdef0",
                "managementPolicy": "ObserveOnly",
                "agent": {"url": agent_url, "tokenSecretRef": {"name": "agent-token", "key": "token"}},
            },
        });
        self.sbx
            .patch(
                name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap_or_else(|e| panic!("applying Sandbox {name}: {e}"));
    }

    /// Plays the Sandbox controller: the instance's EC2 state and the agent URL.
    async fn sandbox_state(&self, name: &str, state: &str, agent_url: &str) {
        let patch = json!({"status": {
            "instance": {"id": "i-0123456789abcdef0", "state": state},
            "agent": {"health": if state == "running" { "Healthy" } else { "Unknown" }, "url": agent_url},
        }});
        self.sbx
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("writing Sandbox {name} status: {e}"));
    }

    async fn bundle(&self, name: &str, spec: serde_json::Value) {
        let obj = json!({
            "apiVersion": "fleet.valet.dev/v1alpha1",
            "kind": "SecretBundle",
            "metadata": {"name": name},
            "spec": spec,
        });
        self.bundles
            .patch(
                name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap_or_else(|e| panic!("applying SecretBundle {name}: {e}"));
    }

    async fn status(&self, name: &str) -> SecretBundleStatus {
        self.bundles
            .get(name)
            .await
            .unwrap()
            .status
            .unwrap_or_default()
    }

    async fn wait(
        &self,
        name: &str,
        secs: u64,
        what: &str,
        f: impl Fn(&SecretBundleStatus) -> bool,
    ) -> SecretBundleStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last = SecretBundleStatus::default();
        loop {
            if let Ok(b) = self.bundles.get(name).await {
                last = b.status.unwrap_or_default();
                if f(&last) {
                    return last;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "{name}: timed out after {secs}s waiting for {what}; last status: {}",
                    serde_json::to_string_pretty(&last).unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn events(&self) -> Vec<Event> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        api.list(&ListParams::default()).await.unwrap().items
    }

    async fn event_reasons(&self, bundle: &str) -> Vec<(String, String)> {
        self.events()
            .await
            .into_iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(bundle))
            .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
            .collect()
    }

    fn fly_file(&self, name: &str) -> String {
        std::fs::read_to_string(self.fly.path().join(name)).unwrap_or_default()
    }

    fn fly_touch(&self, name: &str) {
        std::fs::write(self.fly.path().join(name), "").unwrap();
    }

    fn fly_remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.fly.path().join(name));
    }

    /// The times of the fake flyctl's calls for `app`.
    fn fly_calls(&self, app: &str) -> Vec<f64> {
        self.fly_file("calls.log")
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, a)| *a == app)
            .filter_map(|(t, _)| t.parse().ok())
            .collect()
    }
}

/// Plays the Sandbox controller's probe: copies each agent's `/health` `envSha256` into its
/// Sandbox's `status.agent.envSha256` (with `lastSeen`) when it changes.
#[derive(Clone)]
struct StandIn {
    sbx: Api<Sandbox>,
    agents: Arc<Mutex<Vec<(String, String)>>>,
}

impl StandIn {
    fn start(sbx: Api<Sandbox>) -> StandIn {
        let s = StandIn {
            sbx,
            agents: Arc::default(),
        };
        let me = s.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(1))
                .build()
                .unwrap();
            let mut reported: BTreeMap<String, Option<String>> = BTreeMap::new();
            loop {
                let agents = me.agents.lock().unwrap().clone();
                for (name, url) in agents {
                    let Ok(r) = http.get(format!("{url}/health")).send().await else {
                        continue;
                    };
                    let Ok(v) = r.json::<serde_json::Value>().await else {
                        continue;
                    };
                    let hash = v["envSha256"].as_str().map(str::to_string);
                    if reported.get(&name) == Some(&hash) {
                        continue;
                    }
                    let patch = json!({"status": {"agent": {"envSha256": hash, "lastSeen": now_rfc3339()}}});
                    if me
                        .sbx
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .is_ok()
                    {
                        reported.insert(name, hash);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        s
    }

    fn watch(&self, sandbox: &str, agent: &Agent) {
        self.agents
            .lock()
            .unwrap()
            .push((sandbox.to_string(), agent.url.clone()));
    }
}

fn env_file(agent: &Agent) -> String {
    std::fs::read_to_string(agent.dir.join("valet.env")).unwrap_or_default()
}

fn env_map(agent: &Agent) -> BTreeMap<String, String> {
    envfile::parse(&env_file(agent))
        .unwrap_or_else(|e| panic!("the agent's env file does not parse: {e}"))
        .to_map()
}

fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn target<'a>(st: &'a SecretBundleStatus, name: &str) -> Option<&'a BundleTargetStatus> {
    st.targets.iter().find(|t| t.name == name)
}

fn state_of(st: &SecretBundleStatus, name: &str) -> Option<BundleTargetState> {
    target(st, name).map(|t| t.state)
}

fn cond(st: &SecretBundleStatus, t: &str) -> Option<(String, String, String)> {
    st.conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn ready(st: &SecretBundleStatus) -> bool {
    cond(st, "Ready").is_some_and(|c| c.0 == "True")
}

fn all_synced(st: &SecretBundleStatus, n: i32) -> bool {
    st.total_targets == n && st.synced_targets == n && ready(st)
}

const NASTY: &[(&str, &str)] = &[
    (
        "DATABASE_URL",
        "postgresql://u:p%40ss@db:5432/valet?sslmode=require&x=1",
    ),
    (
        "JWT_SECRET",
        "q\"uo'te $HOME `cmd` \\back\\slash # not a comment",
    ),
    (
        "PRIVATE_KEY",
        "-----BEGIN KEY-----\nMIIBOgIBAAJBAK\n-----END KEY-----\n",
    ),
    ("EMPTY", ""),
    ("SPACES", "  padded  "),
];

#[tokio::test]
async fn twenty_sandboxes_synced_at_max_parallel_then_rotated_by_watch() {
    let e = env("secretbundle-twenty", |_| {}).await;
    let mut agents = Vec::new();
    for _ in 0..20 {
        agents.push(Agent::start("v1", 0).await);
    }
    e.agent_token(&agents[0]).await;
    e.secret("app-env", NASTY).await;
    let stand_in = StandIn::start(e.sbx.clone());
    for (i, a) in agents.iter().enumerate() {
        let name = format!("worker-{i:02}");
        e.sandbox(&name, &[("app", "worker")], &a.url).await;
        e.sandbox_state(&name, "running", &a.url).await;
        stand_in.watch(&name, a);
    }
    // Not selected: never a target.
    e.sandbox("other", &[("app", "web")], "http://127.0.0.1:9")
        .await;
    e.sandbox_state("other", "running", "http://127.0.0.1:9")
        .await;
    e.bundle(
        "worker-env",
        json!({
            "sources": [{"secretName": "app-env"}],
            "targets": {"sandboxes": {"selector": {"matchLabels": {"app": "worker"}}, "restartServices": ["worker"]}},
            "refreshInterval": "1h",
            "maxParallel": 5,
        }),
    )
    .await;
    let st = e
        .wait("worker-env", 90, "20 of 20 synced", |s| all_synced(s, 20))
        .await;
    let want = map(NASTY);
    let hash = st.content_hash.clone().unwrap();
    assert_eq!(st.key_count, 5);
    assert_eq!(
        st.keys,
        [
            "DATABASE_URL",
            "EMPTY",
            "JWT_SECRET",
            "PRIVATE_KEY",
            "SPACES"
        ]
    );
    assert!(target(&st, "other").is_none());
    for (i, a) in agents.iter().enumerate() {
        assert_eq!(env_map(a), want, "worker-{i:02}");
        assert_eq!(envfile::sha256_hex(env_file(a).as_bytes()), hash);
        // The compose worker is recreated (a `restart` would keep its old environment).
        assert!(
            a.docker_calls()
                .contains("up -d --force-recreate --no-deps -t 1 worker"),
            "worker-{i:02}: no restart: {}",
            a.docker_calls()
        );
        let t = target(&st, &format!("worker-{i:02}")).unwrap();
        assert_eq!(t.kind, BundleTargetKind::Sandbox);
        assert_eq!(t.synced_hash.as_deref(), Some(hash.as_str()));
        assert!(t.synced_at.is_some());
    }
    // The file is written 0600.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(agents[0].dir.join("valet.env"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // ---- Rotation: change the Secret; the watch (not the 1h refresh) resyncs every target. ----
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rotated: Vec<(&str, &str)> = NASTY
        .iter()
        .map(|(k, v)| {
            if *k == "DATABASE_URL" {
                (*k, "postgresql://u:rotated@db:5432/valet")
            } else {
                (*k, *v)
            }
        })
        .collect();
    let t0 = Instant::now();
    e.secret("app-env", &rotated).await;
    let want = map(&rotated);
    let deadline = t0 + Duration::from_secs(60);
    loop {
        if agents.iter().all(|a| {
            envfile::parse(&env_file(a))
                .map(|f| f.to_map() == want)
                .unwrap_or(false)
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotation did not reach every agent"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let files = t0.elapsed();
    let st = e
        .wait("worker-env", 60, "20 of 20 synced, rotated", |s| {
            all_synced(s, 20) && s.content_hash.as_deref() != Some(hash.as_str())
        })
        .await;
    let status = t0.elapsed();
    println!(
        "FIGURE rotation, 20 sandboxes, maxParallel 5: Secret update -> last agent file written {:.0} ms; -> bundle status 20/20 synced {:.0} ms",
        files.as_secs_f64() * 1000.0,
        status.as_secs_f64() * 1000.0
    );
    let new_hash = st.content_hash.unwrap();
    for a in &agents {
        assert_eq!(envfile::sha256_hex(env_file(a).as_bytes()), new_hash);
    }
    // Steady state: the stand-in keeps reporting hashes (each a Sandbox status write that wakes
    // the bundle), and the bundle's status is not rewritten.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rv = e
        .bundles
        .get("worker-env")
        .await
        .unwrap()
        .metadata
        .resource_version;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        e.bundles
            .get("worker-env")
            .await
            .unwrap()
            .metadata
            .resource_version,
        rv,
        "the status was rewritten with nothing new"
    );
    let reasons = e.event_reasons("worker-env").await;
    assert!(reasons.iter().any(|(r, _)| r == "Synced"), "{reasons:?}");
}

#[tokio::test]
async fn stopped_sandbox_synced_when_it_starts_and_new_sandbox_when_it_appears() {
    let e = env("secretbundle-lifecycle", |_| {}).await;
    let (a, b, c) = (
        Agent::start("v1", 0).await,
        Agent::start("v1", 0).await,
        Agent::start("v1", 0).await,
    );
    e.agent_token(&a).await;
    e.secret("src", &[("API_KEY", "k-123456"), ("LOG_LEVEL", "debug")])
        .await;
    e.sandbox("a", &[("app", "worker")], &a.url).await;
    e.sandbox_state("a", "running", &a.url).await;
    e.sandbox("b", &[("app", "worker")], &b.url).await;
    e.sandbox_state("b", "stopped", &b.url).await;
    e.bundle(
        "env",
        json!({
            "sources": [{"secretName": "src"}],
            "targets": {"sandboxes": {"selector": {"matchLabels": {"app": "worker"}}}},
        }),
    )
    .await;
    let st = e
        .wait("env", 30, "a synced, b pending", |s| {
            state_of(s, "a") == Some(BundleTargetState::Synced)
                && state_of(s, "b") == Some(BundleTargetState::Pending)
        })
        .await;
    assert!(
        target(&st, "b")
            .unwrap()
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("stopped"),
        "{st:?}"
    );
    // A stopped sandbox does not hold Ready back.
    assert!(ready(&st), "{:?}", cond(&st, "Ready"));
    assert_eq!((st.synced_targets, st.total_targets), (1, 2));
    let want = map(&[("API_KEY", "k-123456"), ("LOG_LEVEL", "debug")]);
    assert_eq!(env_map(&a), want);
    assert_eq!(
        env_file(&b),
        "NODE_ENV=production\n",
        "b was written while stopped"
    );

    // b starts: synced (the Sandbox watch, no refresh).
    e.sandbox_state("b", "running", &b.url).await;
    e.wait("env", 20, "b synced after start", |s| all_synced(s, 2))
        .await;
    assert_eq!(env_map(&b), want);

    // A new matching sandbox appears: synced.
    e.sandbox("c", &[("app", "worker")], &c.url).await;
    e.sandbox_state("c", "running", &c.url).await;
    e.wait("env", 20, "c synced", |s| all_synced(s, 3)).await;
    assert_eq!(env_map(&c), want);

    // a stops matching: it leaves the targets (its file is left as it is).
    e.sandbox("a", &[("app", "retired")], &a.url).await;
    let st = e
        .wait("env", 20, "a gone from the targets", |s| {
            target(s, "a").is_none() && all_synced(s, 2)
        })
        .await;
    assert_eq!(st.targets.len(), 2);
}

#[tokio::test]
async fn drift_reported_by_the_agent_is_corrected_on_refresh() {
    let e = env("secretbundle-drift", |_| {}).await;
    let a = Agent::start("v1", 0).await;
    e.agent_token(&a).await;
    e.secret("src", &[("TOKEN", "drift-test-value")]).await;
    let stand_in = StandIn::start(e.sbx.clone());
    e.sandbox("a", &[], &a.url).await;
    e.sandbox_state("a", "running", &a.url).await;
    stand_in.watch("a", &a);
    e.bundle(
        "env",
        json!({
            "sources": [{"secretName": "src"}],
            "targets": {"sandboxes": {"selector": {}}},
            "refreshInterval": "10s",
        }),
    )
    .await;
    let st = e.wait("env", 30, "synced", |s| all_synced(s, 1)).await;
    let synced_at = target(&st, "a").unwrap().synced_at.clone().unwrap();
    let want = map(&[("TOKEN", "drift-test-value")]);
    assert_eq!(env_map(&a), want);
    // Someone edits the file on the instance; the agent reports the new hash, the stand-in
    // Sandbox controller copies it to status.agent.envSha256, and the bundle puts it back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::fs::write(a.dir.join("valet.env"), "TOKEN=tampered\n").unwrap();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(40);
    while env_map(&a) != want {
        assert!(Instant::now() < deadline, "drift was not corrected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "drift corrected {:.1} s after the edit (refreshInterval 10s)",
        t0.elapsed().as_secs_f64()
    );
    let st = e
        .wait("env", 20, "synced again", |s| {
            all_synced(s, 1) && target(s, "a").unwrap().synced_at.as_ref() != Some(&synced_at)
        })
        .await;
    assert!(ready(&st));
}

#[tokio::test]
async fn a_failed_restart_stays_failed_until_a_push_and_restart_succeed() {
    let e = env("secretbundle-restart-fails", |_| {}).await;
    let a = Agent::start("v1", 0).await;
    e.agent_token(&a).await;
    e.secret("src", &[("API_KEY", "restart-test-value")]).await;
    let stand_in = StandIn::start(e.sbx.clone());
    e.sandbox("a", &[], &a.url).await;
    e.sandbox_state("a", "running", &a.url).await;
    stand_in.watch("a", &a);
    // The worker's restart fails: the agent recreates it (`docker compose up -d --force-recreate
    // --no-deps worker`, since `restart` does not re-read env files), which the fake docker fails
    // while this file exists. The agent writes the env file first.
    let fail = a.dir.join("docker").join("fail-restart");
    std::fs::write(&fail, "").unwrap();
    let restarts = || {
        a.docker_calls()
            .lines()
            .filter(|l| l.starts_with("up ") && l.contains("--force-recreate"))
            .count()
    };
    e.bundle(
        "env",
        json!({
            "sources": [{"secretName": "src"}],
            "targets": {"sandboxes": {"selector": {}, "restartServices": ["worker"]}},
            "refreshInterval": "1h",
        }),
    )
    .await;
    let st = e
        .wait("env", 30, "the target Failed", |s| {
            state_of(s, "a") == Some(BundleTargetState::Failed)
        })
        .await;
    let hash = st.content_hash.clone().unwrap();
    assert!(restarts() >= 1, "{}", a.docker_calls());
    // The file was written, so the agent holds the new content's hash...
    assert_eq!(envfile::sha256_hex(env_file(&a).as_bytes()), hash);
    // ...and reports it: the stand-in Sandbox controller copies it into the Sandbox's status,
    // which wakes the bundle.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = e.sbx.get("a").await.unwrap();
        let reported = s.status.and_then(|st| st.agent).and_then(|a| a.env_sha256);
        if reported.as_deref() == Some(hash.as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent's hash never reached the Sandbox: {reported:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The hash alone is not success: through several retries (backoff 1 s, 2 s, 4 s), each a
    // push whose restart fails again, the target stays Failed and the bundle not Ready.
    let watch_until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < watch_until {
        let st = e.status("env").await;
        assert_eq!(
            state_of(&st, "a"),
            Some(BundleTargetState::Failed),
            "{}",
            serde_json::to_string_pretty(&st).unwrap()
        );
        assert_eq!(st.synced_targets, 0);
        let (status, reason, message) = cond(&st, "Ready").unwrap();
        assert_eq!((status.as_str(), reason.as_str()), ("False", "SyncFailed"));
        assert!(
            message.contains("sandbox a") && message.contains("restarting worker"),
            "{message}"
        );
        let t = target(&st, "a").unwrap();
        assert!(
            t.message
                .as_deref()
                .unwrap_or_default()
                .contains("restarting worker"),
            "{t:?}"
        );
        assert_ne!(t.synced_hash.as_deref(), Some(hash.as_str()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed_restarts = restarts();
    assert!(
        failed_restarts >= 2,
        "the failed target was not retried with a push and a restart: {}",
        a.docker_calls()
    );
    let reasons = e.event_reasons("env").await;
    assert!(
        reasons
            .iter()
            .any(|(r, m)| r == "SyncFailed" && m.contains("restarting worker")),
        "{reasons:?}"
    );
    // The restart works again: the next retry, a push and a restart that succeed, makes it
    // Synced.
    std::fs::remove_file(&fail).unwrap();
    let st = e
        .wait("env", 30, "synced after a successful restart", |s| {
            all_synced(s, 1)
        })
        .await;
    assert!(restarts() > failed_restarts, "{}", a.docker_calls());
    let t = target(&st, "a").unwrap();
    assert_eq!(t.synced_hash.as_deref(), Some(hash.as_str()));
    assert_eq!(t.message, None);
    assert!(cond(&st, "Degraded").is_none(), "{st:?}");
}

#[tokio::test]
async fn invalid_sources_push_nothing_and_name_the_key() {
    let e = env("secretbundle-invalid", |_| {}).await;
    let a = Agent::start("v1", 0).await;
    e.agent_token(&a).await;
    e.sandbox("a", &[("app", "worker")], &a.url).await;
    e.sandbox_state("a", "running", &a.url).await;
    let dup_value = "dup-value-never-shown";
    e.secret("one", &[("SHARED", dup_value), ("ONLY_ONE", "1")])
        .await;
    e.secret("two", &[("SHARED", dup_value)]).await;
    e.secret("bad", &[("my-key", dup_value), ("GOOD", "1")])
        .await;

    // A key two sources define.
    e.bundle(
        "dup",
        json!({
            "sources": [{"secretName": "one"}, {"secretName": "two"}],
            "targets": {"sandboxes": {"selector": {"matchLabels": {"app": "worker"}}}},
        }),
    )
    .await;
    let st = e
        .wait("dup", 20, "InvalidSpec", |s| {
            cond(s, "Ready").is_some_and(|c| c.1 == "InvalidSpec")
        })
        .await;
    let (_, _, msg) = cond(&st, "Ready").unwrap();
    assert!(
        msg.contains("SHARED") && msg.contains("one") && msg.contains("two"),
        "{msg}"
    );
    assert!(!msg.contains(dup_value), "{msg}");

    // A key that is not an environment variable name (no sandbox selected, so nothing could
    // be pushed anyway).
    e.bundle(
        "badkey",
        json!({
            "sources": [{"secretName": "bad"}],
            "targets": {"sandboxes": {"selector": {"matchLabels": {"app": "nobody"}}}},
        }),
    )
    .await;
    let st = e
        .wait("badkey", 20, "InvalidSpec", |s| {
            cond(s, "Ready").is_some_and(|c| c.1 == "InvalidSpec")
        })
        .await;
    let (_, _, msg) = cond(&st, "Ready").unwrap();
    assert!(msg.contains("\"my-key\""), "{msg}");
    assert!(!msg.contains(dup_value), "{msg}");

    // A missing source Secret.
    e.bundle(
        "missing",
        json!({
            "sources": [{"secretName": "not-yet"}],
            "targets": {"sandboxes": {"selector": {"matchLabels": {"app": "nobody"}}}},
        }),
    )
    .await;
    let st = e
        .wait("missing", 20, "SourceSecretMissing", |s| {
            cond(s, "Ready").is_some_and(|c| c.1 == "SourceSecretMissing")
        })
        .await;
    assert!(cond(&st, "Ready").unwrap().2.contains("not-yet"));

    // Nothing was pushed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env_file(&a), "NODE_ENV=production\n");
    assert_eq!(a.docker_calls(), "");
    let st = e.status("dup").await;
    assert!(st.targets.is_empty() && st.content_hash.is_none(), "{st:?}");
    let reasons = e.event_reasons("dup").await;
    assert!(
        reasons
            .iter()
            .any(|(r, m)| r == "InvalidSpec" && m.contains("SHARED")),
        "{reasons:?}"
    );

    // The missing Secret appears: the Secret watch brings the bundle back.
    e.secret("not-yet", &[("X", "1")]).await;
    e.wait("missing", 20, "Ready", ready).await;

    // The duplicate is fixed by an edit: synced.
    e.bundle(
        "dup",
        json!({
            "sources": [{"secretName": "one"}, {"secretName": "two", "keys": ["SHARED"]}],
            "targets": {"sandboxes": {"selector": {"matchLabels": {"app": "worker"}}}},
        }),
    )
    .await;
    // Still a duplicate (two lists SHARED too)...
    e.wait("dup", 20, "still InvalidSpec", |s| {
        cond(s, "Ready").is_some_and(|c| c.1 == "InvalidSpec") && s.observed_generation == Some(2)
    })
    .await;
    // ...until the sources stop overlapping.
    e.bundle(
        "dup",
        json!({
            "sources": [{"secretName": "one"}],
            "targets": {"sandboxes": {"selector": {"matchLabels": {"app": "worker"}}}},
        }),
    )
    .await;
    e.wait("dup", 20, "synced", |s| all_synced(s, 1)).await;
    assert_eq!(
        env_map(&a),
        map(&[("SHARED", dup_value), ("ONLY_ONE", "1")])
    );
}

#[tokio::test]
async fn two_bundles_never_fight_over_one_sandbox() {
    let e = env("secretbundle-overlap", |_| {}).await;
    let a = Agent::start("v1", 0).await;
    e.agent_token(&a).await;
    e.sandbox("a", &[], &a.url).await;
    e.sandbox_state("a", "running", &a.url).await;
    e.secret("first", &[("FIRST", "1")]).await;
    e.secret("second", &[("SECOND", "2")]).await;
    let spec = |src: &str| {
        json!({
            "sources": [{"secretName": src}],
            "targets": {"sandboxes": {"selector": {}}},
        })
    };
    e.bundle("first", spec("first")).await;
    e.wait("first", 20, "synced", |s| all_synced(s, 1)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    e.bundle("second", spec("second")).await;
    let st = e
        .wait("second", 20, "a skipped", |s| {
            state_of(s, "a") == Some(BundleTargetState::Skipped)
        })
        .await;
    let msg = target(&st, "a").unwrap().message.clone().unwrap();
    assert!(msg.contains("SecretBundle first"), "{msg}");
    assert_eq!(cond(&st, "Degraded").unwrap().1, "TargetsSkipped");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env_map(&a), map(&[("FIRST", "1")]));
    assert!(all_synced(&e.status("first").await, 1));
}

fn fly_token() -> String {
    format!("FlyV1 fm2_TESTtoken{}AAAA+/==", std::process::id())
}

#[tokio::test]
async fn fly_import_gets_values_on_stdin_and_the_token_in_its_environment_only() {
    let e = env("secretbundle-fly", |_| {}).await;
    e.secret("src", NASTY).await;
    let token = fly_token();
    e.secret("fly", &[("token", &token)]).await;
    e.bundle(
        "fly",
        json!({
            "sources": [{"secretName": "src"}],
            "targets": {"flyApps": [
                {"app": "valet-api", "tokenSecretRef": {"name": "fly", "key": "token"}},
                {"app": "valet-worker-stg", "tokenSecretRef": {"name": "fly", "key": "token"}, "stage": true},
            ]},
        }),
    )
    .await;
    let st = e
        .wait("fly", 30, "both apps synced", |s| all_synced(s, 2))
        .await;
    let t = target(&st, "valet-api").unwrap();
    assert_eq!(t.kind, BundleTargetKind::FlyApp);
    assert_eq!(t.synced_hash, st.content_hash);

    assert_eq!(
        e.fly_file("argv-valet-api.log"),
        "secrets import --app valet-api \n"
    );
    assert_eq!(
        e.fly_file("argv-valet-worker-stg.log"),
        "secrets import --app valet-worker-stg --stage \n"
    );
    // The values arrive on stdin, exactly as flyctl will read them.
    assert_eq!(
        fly::parse_import(&e.fly_file("stdin-valet-api")),
        Some(map(NASTY))
    );
    // The token arrives in the environment...
    assert_eq!(e.fly_file("token-valet-api"), token);
    let names: Vec<String> = e
        .fly_file("env-valet-api.log")
        .lines()
        .map(str::to_string)
        .collect();
    assert!(names.contains(&"FLY_API_TOKEN".to_string()), "{names:?}");
    // ...which holds nothing else of the operator's (no KUBECONFIG, no AWS keys, no values).
    let allowed = [
        "FLY_API_TOKEN",
        "FAKE_FLYCTL_DIR",
        "PATH",
        "HOME",
        "TMPDIR",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "NO_PROXY",
        "https_proxy",
        "http_proxy",
        "no_proxy",
    ];
    for n in &names {
        assert!(
            allowed.contains(&n.as_str()),
            "unexpected variable {n} in flyctl's environment"
        );
    }
    // ...and never in argv.
    let argv = e.fly_file("argv-valet-api.log") + &e.fly_file("argv-valet-worker-stg.log");
    assert!(!argv.contains("fm2_"), "{argv}");
    for (_, v) in NASTY.iter().filter(|(_, v)| v.len() > 2) {
        assert!(!argv.contains(v), "{argv}");
    }
}

#[tokio::test]
async fn fly_app_missing_is_skipped_with_a_warning_and_not_retried_in_a_storm() {
    let e = env("secretbundle-fly-missing", |_| {}).await;
    e.secret("src", &[("A", "value-a")]).await;
    e.secret("fly", &[("token", &fly_token())]).await;
    e.fly_touch("missing-ghost");
    e.bundle(
        "fly",
        json!({
            "sources": [{"secretName": "src"}],
            "targets": {"flyApps": [
                {"app": "ghost", "tokenSecretRef": {"name": "fly", "key": "token"}},
                {"app": "real", "tokenSecretRef": {"name": "fly", "key": "token"}},
            ]},
            "refreshInterval": "1h",
        }),
    )
    .await;
    let st = e
        .wait("fly", 30, "ghost skipped, real synced", |s| {
            state_of(s, "ghost") == Some(BundleTargetState::Skipped)
                && state_of(s, "real") == Some(BundleTargetState::Synced)
        })
        .await;
    let d = cond(&st, "Degraded").expect("a Degraded condition");
    assert_eq!((d.0.as_str(), d.1.as_str()), ("True", "TargetsSkipped"));
    assert!(d.2.contains("ghost"), "{d:?}");
    assert!(ready(&st), "skipped apps do not hold Ready back");
    let msg = target(&st, "ghost").unwrap().message.clone().unwrap();
    assert!(msg.contains("does not exist"), "{msg}");
    assert!(!msg.contains("value-a"), "{msg}");
    // No retry storm: one call, and still one a few seconds later.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(e.fly_calls("ghost").len(), 1);
    assert_eq!(e.fly_calls("real").len(), 1);
    let reasons = e.event_reasons("fly").await;
    assert!(
        reasons
            .iter()
            .any(|(r, m)| r == "TargetSkipped" && m.contains("ghost")),
        "{reasons:?}"
    );
    // A spec change tries it again (the app now exists).
    e.fly_remove("missing-ghost");
    e.bundle(
        "fly",
        json!({
            "sources": [{"secretName": "src"}],
            "targets": {"flyApps": [
                {"app": "ghost", "tokenSecretRef": {"name": "fly", "key": "token"}},
                {"app": "real", "tokenSecretRef": {"name": "fly", "key": "token"}},
            ]},
            "refreshInterval": "2h",
        }),
    )
    .await;
    let st = e.wait("fly", 20, "both synced", |s| all_synced(s, 2)).await;
    assert!(cond(&st, "Degraded").is_none());
    assert_eq!(e.fly_calls("ghost").len(), 2);
    assert_eq!(
        e.fly_calls("real").len(),
        1,
        "a synced app is not imported again"
    );
}

#[tokio::test]
async fn failing_flyctl_is_retried_with_exponential_backoff() {
    let e = env("secretbundle-fly-failing", |_| {}).await;
    e.secret("src", &[("A", "value-that-flyctl-echoes")]).await;
    e.secret("fly", &[("token", &fly_token())]).await;
    e.fly_touch("fail-api");
    e.bundle(
        "fly",
        json!({
            "sources": [{"secretName": "src"}],
            "targets": {"flyApps": [{"app": "api", "tokenSecretRef": {"name": "fly", "key": "token"}}]},
        }),
    )
    .await;
    let st = e
        .wait("fly", 20, "failed", |s| {
            state_of(s, "api") == Some(BundleTargetState::Failed)
        })
        .await;
    let (status, reason, _) = cond(&st, "Ready").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "SyncFailed"));
    let msg = target(&st, "api").unwrap().message.clone().unwrap();
    assert!(msg.contains("[redacted]"), "{msg}");
    assert!(!msg.contains("value-that-flyctl-echoes"), "{msg}");
    // Retried after about 1 s, 2 s, 4 s (base 1 s, doubling).
    let deadline = Instant::now() + Duration::from_secs(30);
    while e.fly_calls("api").len() < 4 {
        assert!(Instant::now() < deadline, "calls: {:?}", e.fly_calls("api"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = e.fly_calls("api");
    let gaps: Vec<f64> = calls.windows(2).map(|w| w[1] - w[0]).collect();
    println!("flyctl retry gaps: {gaps:?}");
    assert!(gaps[0] >= 0.5 && gaps[0] < 2.5, "{gaps:?}");
    assert!(gaps[1] > gaps[0] && gaps[2] > gaps[1], "{gaps:?}");
    assert!(gaps[2] >= 3.0, "{gaps:?}");
    let reasons = e.event_reasons("fly").await;
    assert!(
        reasons.iter().any(|(r, _)| r == "SyncFailed"),
        "{reasons:?}"
    );
    // It recovers on the next retry once flyctl works.
    e.fly_remove("fail-api");
    e.wait("fly", 30, "synced", |s| all_synced(s, 1)).await;
}

#[tokio::test]
async fn a_bad_fly_token_is_invalid_spec_and_flyctl_never_runs() {
    let e = env("secretbundle-fly-token", |_| {}).await;
    e.secret("src", &[("A", "1234")]).await;
    e.secret("fly", &[("token", "ghp_notaflytoken")]).await;
    e.bundle(
        "fly",
        json!({
            "sources": [{"secretName": "src"}],
            "targets": {"flyApps": [{"app": "api", "tokenSecretRef": {"name": "fly", "key": "token"}}]},
        }),
    )
    .await;
    let st = e
        .wait("fly", 20, "InvalidSpec", |s| {
            cond(s, "Ready").is_some_and(|c| c.1 == "InvalidSpec")
        })
        .await;
    let msg = cond(&st, "Ready").unwrap().2;
    assert!(msg.contains("not a Fly.io token"), "{msg}");
    assert!(!msg.contains("ghp_"), "{msg}");
    assert_eq!(state_of(&st, "api"), Some(BundleTargetState::Failed));
    // An empty token too.
    e.secret("fly", &[("token", "  ")]).await;
    e.wait("fly", 20, "empty token", |s| {
        cond(s, "Ready").is_some_and(|c| c.1 == "InvalidSpec" && c.2.contains("empty"))
    })
    .await;
    assert!(e.fly_calls("api").is_empty(), "flyctl ran with a bad token");
    // Fixing the token Secret (watched) syncs at once.
    e.secret("fly", &[("token", &fly_token())]).await;
    e.wait("fly", 20, "synced", |s| all_synced(s, 1)).await;
    assert_eq!(e.fly_calls("api").len(), 1);
}

/// A `tracing` writer into a shared buffer, to read the controller's own logs.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "current_thread")]
async fn a_canary_value_leaks_nowhere() {
    // The controller runs on this test's (single) thread, so a thread-local subscriber sees
    // every line it logs, at debug level, kube's and reqwest's included.
    let logs = LogBuf::default();
    let subscriber = {
        let w = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_writer(move || w.clone())
            .with_ansi(false)
            .finish()
    };
    let _guard = tracing::subscriber::set_default(subscriber);
    // tracing-core computes a callsite's interest from the registering thread's default when
    // exactly one dispatcher exists (tokio-rs/tracing#3611): a sibling test (no subscriber)
    // reaching a callsite first would cache "never" and blind this capture. A second live
    // dispatcher makes it consult every dispatcher instead.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());

    let canary = format!(
        "CANARY{}x{}",
        std::process::id(),
        Timestamp::now().as_nanosecond()
    );
    let quoted = format!("pre \"{canary}\" $post\nsecond line {canary}");
    let e = env("secretbundle-canary", |_| {}).await;
    let up = Agent::start("v1", 0).await;
    let mut down = Agent::start("v1", 0).await;
    e.agent_token(&up).await;
    e.secret(
        "src",
        &[("CANARY", &canary), ("QUOTED", &quoted), ("PLAIN", "plain")],
    )
    .await;
    e.secret("dup", &[("CANARY", &canary)]).await;
    e.secret("badname", &[("not-a-name", &canary)]).await;
    e.secret("fly", &[("token", &fly_token())]).await;
    e.sandbox("up", &[("app", "w")], &up.url).await;
    e.sandbox_state("up", "running", &up.url).await;
    e.sandbox("down", &[("app", "w")], &down.url).await;
    e.sandbox_state("down", "running", &down.url).await;
    down.stop();
    // flyctl fails echoing its input; another app is missing (and echoes too).
    e.fly_touch("fail-echo");
    e.fly_touch("missing-ghost");
    e.bundle(
        "leaky",
        json!({
            "sources": [{"secretName": "src"}],
            "targets": {
                "sandboxes": {"selector": {"matchLabels": {"app": "w"}}, "restartServices": ["worker"]},
                "flyApps": [
                    {"app": "echo", "tokenSecretRef": {"name": "fly", "key": "token"}},
                    {"app": "ghost", "tokenSecretRef": {"name": "fly", "key": "token"}},
                ],
            },
        }),
    )
    .await;
    e.bundle(
        "dup",
        json!({
            "sources": [{"secretName": "src"}, {"secretName": "dup"}],
            "targets": {"sandboxes": {"selector": {"matchLabels": {"app": "nobody"}}}},
        }),
    )
    .await;
    e.bundle(
        "badname",
        json!({
            "sources": [{"secretName": "badname"}],
            "targets": {"sandboxes": {"selector": {"matchLabels": {"app": "nobody"}}}},
        }),
    )
    .await;
    let st = e
        .wait("leaky", 40, "every path taken", |s| {
            state_of(s, "up") == Some(BundleTargetState::Synced)
                && state_of(s, "down") == Some(BundleTargetState::Failed)
                && state_of(s, "echo") == Some(BundleTargetState::Failed)
                && state_of(s, "ghost") == Some(BundleTargetState::Skipped)
        })
        .await;
    assert!(
        target(&st, "echo")
            .unwrap()
            .message
            .as_deref()
            .unwrap()
            .contains("[redacted]")
    );
    e.wait("dup", 20, "InvalidSpec", |s| {
        cond(s, "Ready").is_some_and(|c| c.1 == "InvalidSpec")
    })
    .await;
    e.wait("badname", 20, "InvalidSpec", |s| {
        cond(s, "Ready").is_some_and(|c| c.1 == "InvalidSpec")
    })
    .await;
    // Let the failing targets be retried a few times.
    let deadline = Instant::now() + Duration::from_secs(20);
    while e.fly_calls("echo").len() < 3 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Sanity: the canary did travel where it should.
    assert!(env_file(&up).contains(&canary));
    assert!(e.fly_file("stdin-echo").contains(&canary));

    let mut places: Vec<(String, String)> = Vec::new();
    places.push((
        "operator logs".into(),
        String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string(),
    ));
    assert!(
        places[0].1.contains("push failed"),
        "logs were not captured"
    );
    for ev in e.events().await {
        places.push((
            format!("event {}", ev.metadata.name.clone().unwrap_or_default()),
            serde_json::to_string(&ev).unwrap(),
        ));
    }
    for b in e.bundles.list(&ListParams::default()).await.unwrap() {
        places.push((
            format!(
                "SecretBundle {}",
                b.metadata.name.clone().unwrap_or_default()
            ),
            serde_json::to_string(&b).unwrap(),
        ));
    }
    for s in e.sbx.list(&ListParams::default()).await.unwrap() {
        places.push((
            format!("Sandbox {}", s.metadata.name.clone().unwrap_or_default()),
            serde_json::to_string(&s).unwrap(),
        ));
    }
    // The child processes' argv (and environment names).
    for f in files_under(e.fly.path()) {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("argv-") || name.starts_with("env-") || name == "calls.log" {
            places.push((
                format!("flyctl {name}"),
                std::fs::read_to_string(&f).unwrap(),
            ));
        }
    }
    places.push(("agent log (up)".into(), up.logs()));
    places.push(("agent log (down)".into(), down.logs()));
    places.push(("fake docker calls (up)".into(), up.docker_calls()));
    // The ledger is not built yet: nothing to search there.
    for (place, text) in &places {
        assert!(
            !text.contains(&canary),
            "the canary leaked into {place}: {}",
            text.lines()
                .filter(|l| l.contains(&canary))
                .take(3)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(places.len() > 8, "{}", places.len());
}

// ---------------------------------------------------------------------------------------------
// End to end: the operator binary, a real agent whose deploy env file is the pushed env file,
// canaries in every shape (plain, multi-line, quotes, backslashes, dollars, unicode, `=`), and
// every failure that prints the env file.

/// Every row of every table of a ledger database, as text.
async fn ledger_dump(url: &str) -> String {
    use sqlx::{AssertSqlSafe, Connection, Row};
    let mut out = String::new();
    if url.starts_with("postgres") {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        let tables: Vec<String> =
            sqlx::query("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
                .fetch_all(&mut c)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
        for t in tables {
            let q = format!("SELECT row_to_json(x)::text FROM \"{t}\" x");
            for r in sqlx::query(AssertSqlSafe(q))
                .fetch_all(&mut c)
                .await
                .unwrap()
            {
                out.push_str(&format!("{t}: {}\n", r.get::<String, _>(0)));
            }
        }
    } else {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        let tables: Vec<String> =
            sqlx::query("SELECT name FROM sqlite_master WHERE type = 'table'")
                .fetch_all(&mut c)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
        for t in tables {
            let q = format!("SELECT name FROM pragma_table_info('{t}')");
            let cols: Vec<String> = sqlx::query(AssertSqlSafe(q))
                .fetch_all(&mut c)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            // Every column as bytes (a BLOB column's too), read as text.
            let row = cols
                .iter()
                .map(|c| format!("CAST(\"{c}\" AS BLOB)"))
                .collect::<Vec<_>>()
                .join(", ");
            let q = format!("SELECT {row} FROM \"{t}\"");
            for r in sqlx::query(AssertSqlSafe(q))
                .fetch_all(&mut c)
                .await
                .unwrap()
            {
                let cells: Vec<String> = (0..cols.len())
                    .map(|i| {
                        let b: Option<Vec<u8>> = r.get(i);
                        String::from_utf8_lossy(&b.unwrap_or_default()).into_owned()
                    })
                    .collect();
                out.push_str(&format!("{t}: {}\n", cells.join(" | ")));
            }
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LedgerDb {
    Sqlite,
    Postgres,
}

mod canaries_in_every_form_leak_nowhere_end_to_end {
    #[tokio::test]
    async fn sqlite() {
        super::canaries_end_to_end(super::LedgerDb::Sqlite).await
    }
    #[tokio::test]
    async fn postgres() {
        super::canaries_end_to_end(super::LedgerDb::Postgres).await
    }
}

async fn canaries_end_to_end(db: LedgerDb) {
    use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions};

    let uniq = format!(
        "{:x}{:x}",
        std::process::id(),
        Timestamp::now().as_nanosecond()
    );
    let canaries: Vec<(&str, String)> = vec![
        ("PLAIN_SECRET", format!("plainCanary{uniq}")),
        (
            "PEM_KEY",
            format!(
                "-----BEGIN PRIVATE KEY-----\nMIIEvQ{uniq}BADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC{uniq}x7==\n-----END PRIVATE KEY-----\n"
            ),
        ),
        ("SPECIAL", format!("sp\"ec\\ia$l{uniq} `tick` 'q'")),
        ("UNICODE_EQ", format!("ünï=cödé{uniq}✓ key=value")),
    ];
    let client = support::client().await;
    let ns = support::namespace(&client, &format!("canary-e2e-{db:?}")).await;
    let ec2 = Ec2Endpoint::start(Ec2EndpointOptions::default())
        .await
        .unwrap();
    let ami = ec2.defaults().await.unwrap().ami;
    let ledger_url = match db {
        LedgerDb::Sqlite => None,
        LedgerDb::Postgres => {
            let pg = tokio::task::spawn_blocking(crate::ledger::shared_postgres)
                .await
                .unwrap();
            Some(pg.create_database(&format!("canary_{uniq}")).await.unwrap())
        }
    };
    let fly = tempfile::tempdir().unwrap();
    std::fs::write(fly.path().join("fail-echo"), "").unwrap();
    let fly_env = format!("FAKE_FLYCTL_DIR={}", fly.path().display());
    // This test takes the flyctl path (its failure echoes the input); the API has its own.
    let mut args = vec![
        "--fly-method",
        "flyctl",
        "--flyctl",
        FAKE_FLYCTL,
        "--flyctl-env",
        &fly_env,
    ];
    if let Some(u) = &ledger_url {
        args.extend(["--ledger", u.as_str()]);
    }
    let mut op = support::Operator::start(&ns, &ec2.url(), &args);
    let ledger_url = ledger_url.unwrap_or_else(|| op.ledger.clone());

    // The agent: one env file for deploys and pushes. Every failing docker call prints it; the
    // restart after a push fails, and so will the deploy's pull.
    let agent = Agent::start_one_env_file("v1").await;
    for f in ["leak-env", "fail-restart", "fail-pull"] {
        agent.docker_control(f, true);
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let sbx: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let bundles: Api<SecretBundle> = Api::namespaced(client.clone(), &ns);
    let secret = |name: &str, kv: Vec<(String, String)>| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "data": kv.into_iter().map(|(k, v)| {
                use base64::Engine as _;
                (k, base64::engine::general_purpose::STANDARD.encode(v))
            }).collect::<BTreeMap<_, _>>(),
        }))
        .unwrap()
    };
    for s in [
        secret("agent-token", vec![("token".into(), agent.token.clone())]),
        secret("fly", vec![("token".into(), fly_token())]),
        secret(
            "src",
            canaries
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        ),
    ] {
        let name = s.metadata.name.clone().unwrap();
        secrets
            .patch(
                &name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&s),
            )
            .await
            .unwrap();
    }
    let sandbox = json!({
        "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "Sandbox",
        "metadata": {"name": "w1", "labels": {"app": "w"}},
        "spec": {
            "environment": "staging", "instanceType": "t3.large", "launch": {"imageId": ami},
            "agent": {"url": agent.url, "tokenSecretRef": {"name": "agent-token", "key": "token"}, "probeInterval": "1s", "timeout": "1s"},
        },
    });
    sbx.patch(
        "w1",
        &PatchParams::apply("test").force(),
        &Patch::Apply(&sandbox),
    )
    .await
    .unwrap();
    let wait_sandbox = |what: &'static str, f: fn(&Sandbox) -> bool| {
        let sbx = sbx.clone();
        let log = op.log.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let s = sbx.get("w1").await.unwrap();
                if f(&s) {
                    return s;
                }
                assert!(
                    Instant::now() < deadline,
                    "w1: timed out waiting for {what}: {}\n{}",
                    serde_json::to_string_pretty(&s.status).unwrap(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    let cond_of = |s: &Sandbox, t: &str| {
        s.status
            .as_ref()
            .and_then(|st| st.conditions.iter().find(|c| c.type_ == t).cloned())
    };
    wait_sandbox("Ready", |s| {
        s.status.as_ref().is_some_and(|st| {
            st.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    })
    .await;

    // ---- The push: written, then the restart fails printing the file. And flyctl fails
    // echoing its input. ----
    let bundle = json!({
        "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "SecretBundle",
        "metadata": {"name": "canaries"},
        "spec": {
            "sources": [{"secretName": "src"}],
            "targets": {
                "sandboxes": {"selector": {"matchLabels": {"app": "w"}}, "restartServices": ["worker"]},
                "flyApps": [{"app": "echo", "tokenSecretRef": {"name": "fly", "key": "token"}}],
            },
        },
    });
    bundles
        .patch(
            "canaries",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&bundle),
        )
        .await
        .unwrap();
    // The restart's failure is reported (an Event, the ledger, the target's message, which may
    // turn Synced once the agent's hash matches); flyctl's failure stays.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = bundles
            .get("canaries")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        let fly_failed = target(&st, "echo")
            .is_some_and(|t| t.state == BundleTargetState::Failed && t.message.is_some());
        let ledger = ledger_dump(&ledger_url).await;
        if fly_failed && ledger.contains("fake docker: restart failed") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the push did not fail as arranged: {}\n{}",
            serde_json::to_string_pretty(&st).unwrap(),
            op.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Sanity: the values did reach the agent's one env file, escaped there.
    let file = std::fs::read_to_string(agent.dir.join("gh.env")).unwrap();
    let parsed = envfile::parse(&file).unwrap().to_map();
    for (k, v) in &canaries {
        assert_eq!(parsed.get(*k), Some(v), "{k} in {file}");
    }
    assert!(
        file.contains(&envfile::render_value(&canaries[2].1)),
        "{file}"
    );
    assert!(!file.contains(&canaries[2].1), "{file}");

    // ---- A deploy whose pull fails, printing the env file (the same file the push wrote). ----
    let patch = json!({"spec": {"image": {"tag": "v2"}}});
    sbx.patch("w1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let s = wait_sandbox("the deploy to fail", |s| {
        s.status
            .as_ref()
            .and_then(|st| st.deploy.as_ref())
            .is_some_and(|d| {
                d.tag == "v2" && (d.state.as_str() == "RolledBack" || d.state.as_str() == "Failed")
            })
    })
    .await;
    let up = cond_of(&s, "ImageUpToDate").unwrap();
    assert!(up.message.contains("fake docker: pull failed"), "{up:?}");
    let deploy_msg = s
        .status
        .unwrap()
        .deploy
        .unwrap()
        .message
        .unwrap_or_default();
    assert!(
        deploy_msg.contains("fake docker: pull failed"),
        "{deploy_msg}"
    );

    // ---- A check whose command prints the file: `docker compose ps` fails. ----
    agent.docker_control("fail-ps", true);
    let s = wait_sandbox("AgentHealthy to report the failing compose check", |s| {
        s.status.as_ref().is_some_and(|st| {
            st.conditions
                .iter()
                .any(|c| c.type_ == "AgentHealthy" && c.message.contains("fake docker: ps failed"))
        })
    })
    .await;
    let healthy = cond_of(&s, "AgentHealthy").unwrap().message;

    // The ledger has the failed deploy step.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ledger = loop {
        let text = ledger_dump(&ledger_url).await;
        if text.contains("fake docker: pull failed") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no failed deploy step in the ledger:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    // ---- Everywhere text went. ----
    let mut places: Vec<(String, String)> = vec![("ledger".into(), ledger)];
    let ev: Api<Event> = Api::namespaced(client.clone(), &ns);
    let events = ev.list(&ListParams::default()).await.unwrap().items;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("DeployFailed")),
        "no DeployFailed event"
    );
    for e in events {
        places.push((
            format!("event {}", e.metadata.name.clone().unwrap_or_default()),
            serde_json::to_string(&e).unwrap(),
        ));
    }
    for s in sbx.list(&ListParams::default()).await.unwrap() {
        places.push(("Sandbox".into(), serde_json::to_string(&s).unwrap()));
    }
    for b in bundles.list(&ListParams::default()).await.unwrap() {
        places.push(("SecretBundle".into(), serde_json::to_string(&b).unwrap()));
    }
    let health = reqwest::get(format!("{}/health", agent.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(health.contains("fake docker: ps failed"), "{health}");
    places.push(("agent /health".into(), health));
    places.push(("agent state file".into(), agent.state_file()));
    places.push(("agent log".into(), agent.logs()));
    for f in files_under(fly.path()) {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("stdin-") && !name.starts_with("token-") {
            places.push((
                format!("flyctl {name}"),
                std::fs::read_to_string(&f).unwrap(),
            ));
        }
    }
    op.kill();
    places.push(("operator log".into(), op.logs()));
    if let Some(path) = ledger_url.strip_prefix("sqlite://") {
        let dir = Path::new(path).parent().unwrap();
        for f in files_under(dir) {
            if f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("ledger.db"))
            {
                places.push((
                    format!("ledger file {}", f.display()),
                    String::from_utf8_lossy(&std::fs::read(&f).unwrap()).to_string(),
                ));
            }
        }
    }
    let leaks = support::find_leaks(&canaries, &places);
    assert!(leaks.is_empty(), "leaked:\n{}", leaks.join("\n"));
    assert!(places.len() > 8, "{}", places.len());
    // The printed env file reached status, masked (not dropped).
    for m in [&deploy_msg, &healthy] {
        assert!(m.contains("[redacted]"), "{m}");
    }
}

#[tokio::test]
async fn seeding_teaches_the_redaction_every_bundle_value_and_agent_token() {
    use sandbox_operator::redact::{MASK, process};
    let client = support::client().await;
    let ns = support::namespace(&client, "secretbundle-seed").await;
    let uniq = format!("{:x}", Timestamp::now().as_nanosecond());
    let value = format!("seed \"quoted\" $v{uniq}\nsecond-line-{uniq}");
    let unselected = format!("also-in-the-source-{uniq}");
    let agent_token = format!("agent-token-seed-{uniq}");
    let fly = fly_token();
    let e = Env {
        bundles: Api::namespaced(client.clone(), &ns),
        sbx: Api::namespaced(client.clone(), &ns),
        secrets: Api::namespaced(client.clone(), &ns),
        client: client.clone(),
        ns: ns.clone(),
        fly: tempfile::tempdir().unwrap(),
        _stop: tokio::sync::oneshot::channel().0,
    };
    e.secret("src", &[("SEEDED", &value), ("OTHER", &unselected)])
        .await;
    e.secret("fly", &[("token", &fly)]).await;
    e.secret("agent-token", &[("token", &agent_token)]).await;
    e.sandbox("s1", &[("app", "none")], "http://127.0.0.1:9")
        .await;
    e.bundle(
        "seeded",
        json!({
            "sources": [{"secretName": "src", "keys": ["SEEDED"]}],
            "targets": {"flyApps": [{"app": "a", "tokenSecretRef": {"name": "fly", "key": "token"}}]},
        }),
    )
    .await;
    // No controller runs: what the redaction knows comes from the seeding alone.
    let before = process().redact(&value);
    assert!(!before.contains(MASK), "already known: {before}");
    let read = secretbundle::seed_redactor(&client, Some(&ns), Duration::from_secs(10)).await;
    assert_eq!(read, 3);
    let printed = format!(
        "compose failed: {} / {} / {} / {} / {}",
        envfile::render_value(&value),
        unselected,
        fly,
        agent_token,
        serde_json::to_string(&value).unwrap()
    );
    let out = process().redact(&printed);
    for leak in [uniq.as_str(), "second-line", "fm2_", "agent-token-seed"] {
        assert!(!out.contains(leak), "{leak} in {out}");
    }
    assert!(out.starts_with("compose failed: "), "{out}");
    // A KEY=value line of the bundle's keys is masked whatever its value.
    assert_eq!(process().redact("SEEDED=x"), format!("SEEDED={MASK}"));
}

// ---------------------------------------------------------------------------------------------
// Fly.io through its Machines API, against tests/tools/fly-api/fly_api.py: a local stand-in
// (Fly's API cannot run here) that answers exactly the documented app secrets requests and
// errors, checks the bearer token, keeps each app's secrets with its own digests, and can be told
// to throttle or fail. The controller under test talks HTTP to it as it would to Fly.

const FLY_API_STANDIN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/tools/fly-api/fly_api.py"
);

struct FlyApiStandIn {
    child: std::process::Child,
    url: String,
    http: reqwest::Client,
}

impl FlyApiStandIn {
    async fn start() -> Self {
        let venv = sandbox_operator::testenv::cache_dir().join("venv/bin/python");
        let python = if venv.exists() {
            venv
        } else {
            PathBuf::from("python3")
        };
        let mut child = std::process::Command::new(&python)
            .arg(FLY_API_STANDIN)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {FLY_API_STANDIN} with {}: {e}", python.display())
            });
        let stdout = child.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .unwrap();
            line
        })
        .await
        .unwrap();
        let port: u16 = line
            .trim()
            .strip_prefix("LISTENING ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the Fly API stand-in said {line:?}"));
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        }
    }

    async fn control(&self, path: &str, body: serde_json::Value) {
        let r = self
            .http
            .post(format!("{}/_standin/{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }

    async fn app(&self, name: &str) {
        self.control("apps", json!({"name": name})).await;
    }

    async fn token(&self, token: &str) {
        self.control("tokens", json!({"token": token})).await;
    }

    /// The app's next `times` requests answer `status`.
    async fn fault(&self, app: &str, status: u16, times: u32, retry_after: Option<u64>) {
        self.control(
            "faults",
            json!({"app": app, "status": status, "times": times, "retry_after": retry_after}),
        )
        .await;
    }

    /// What the app's Machines would read.
    async fn values(&self, app: &str) -> BTreeMap<String, String> {
        self.http
            .get(format!("{}/_standin/values/{app}", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Every request: method, path, status, token_ok.
    async fn log(&self) -> Vec<serde_json::Value> {
        self.http
            .get(format!("{}/_standin/log", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn log_for(&self, app: &str) -> Vec<(String, u16)> {
        let path = format!("/v1/apps/{app}/secrets");
        self.log()
            .await
            .into_iter()
            .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with(&path)))
            .map(|r| {
                (
                    r["method"].as_str().unwrap().to_string(),
                    r["status"].as_u64().unwrap() as u16,
                )
            })
            .collect()
    }

    /// Someone else, through the documented API: `POST /v1/apps/{app}/secrets`.
    async fn set_as_someone_else(&self, token: &str, app: &str, values: serde_json::Value) {
        let r = self
            .http
            .post(format!("{}/v1/apps/{app}/secrets", self.url))
            .bearer_auth(token)
            .json(&json!({ "values": values }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    /// `GET /v1/apps/{app}/secrets`: name -> digest.
    async fn digests(&self, token: &str, app: &str) -> BTreeMap<String, String> {
        let v: serde_json::Value = self
            .http
            .get(format!("{}/v1/apps/{app}/secrets", self.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_string(),
                    s["digest"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

impl Drop for FlyApiStandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A namespace and the controller, with the API as the default method, pointed at `api`.
async fn api_env(test: &str, api: &FlyApiStandIn) -> Env {
    let url = api.url.clone();
    env(test, move |s| {
        s.fly_api = secretbundle::FlyApiSettings {
            url,
            timeout: Duration::from_secs(10),
        };
        s.fly_api_default = true;
    })
    .await
}

fn fly_of(st: &SecretBundleStatus, app: &str) -> sandbox_operator::api::FlyAppStatus {
    target(st, app)
        .and_then(|t| t.fly.clone())
        .unwrap_or_default()
}

fn reason_of(st: &SecretBundleStatus, app: &str) -> Option<String> {
    target(st, app).and_then(|t| t.reason.clone())
}

#[tokio::test]
async fn fly_api_sets_staged_secrets_unsets_removed_keys_and_leaves_others_alone() {
    let api = FlyApiStandIn::start().await;
    let token = fly_token();
    api.token(&token).await;
    api.app("web").await;
    // A secret someone else set: never this bundle's to touch.
    api.set_as_someone_else(&token, "web", json!({"THEIRS": "not-ours"}))
        .await;
    let theirs = api.digests(&token, "web").await["THEIRS"].clone();
    let e = api_env("secretbundle-flyapi-push", &api).await;
    e.secret("src", NASTY).await;
    e.secret("fly", &[("token", &token)]).await;
    e.bundle(
        "fly",
        json!({
            "sources": [{"secretName": "src"}],
            "targets": {"flyApps": [{"app": "web", "tokenSecretRef": {"name": "fly", "key": "token"}}]},
        }),
    )
    .await;
    let st = e
        .wait("fly", 30, "web staged", |s| {
            state_of(s, "web") == Some(BundleTargetState::Staged)
        })
        .await;
    // Every value arrived exactly, next to the other secret.
    let mut want = map(NASTY);
    want.insert("THEIRS".into(), "not-ours".into());
    assert_eq!(api.values("web").await, want);
    // Staged is said as it is: set, not deployed; never Synced.
    let t = target(&st, "web").unwrap();
    assert!(
        t.message
            .as_deref()
            .unwrap()
            .contains("staged, not deployed"),
        "{t:?}"
    );
    assert_eq!(st.synced_targets, 0);
    let (status, why, msg) = cond(&st, "Ready").unwrap();
    assert_eq!((status.as_str(), why.as_str()), ("True", "Staged"), "{msg}");
    assert!(
        msg.contains("staged, not deployed: Fly.io app web"),
        "{msg}"
    );
    let mut keys: Vec<String> = NASTY.iter().map(|(k, _)| k.to_string()).collect();
    keys.sort();
    assert_eq!(fly_of(&st, "web").managed_keys, keys);
    assert_eq!(t.synced_hash, st.content_hash);
    // Nothing of the values or their digests in status.
    let status_json = serde_json::to_string(&st).unwrap();
    for (_, d) in api.digests(&token, "web").await {
        assert!(
            !status_json.contains(&d),
            "a digest in status: {status_json}"
        );
    }
    assert!(
        e.event_reasons("fly")
            .await
            .iter()
            .any(|(r, m)| r == "Staged" && m.contains("staged, not deployed"))
    );

    // A key removed from the source Secret is unset on the app; THEIRS stays as it was.
    let fewer: Vec<(&str, &str)> = NASTY
        .iter()
        .copied()
        .filter(|(k, _)| *k != "JWT_SECRET" && *k != "EMPTY")
        .collect();
    e.secret("src", &fewer).await;
    let st = e
        .wait("fly", 30, "JWT_SECRET and EMPTY unset", |s| {
            state_of(s, "web") == Some(BundleTargetState::Staged)
                && !fly_of(s, "web")
                    .managed_keys
                    .iter()
                    .any(|k| k == "JWT_SECRET")
        })
        .await;
    let mut want = map(&fewer);
    want.insert("THEIRS".into(), "not-ours".into());
    assert_eq!(api.values("web").await, want);
    assert_eq!(api.digests(&token, "web").await["THEIRS"], theirs);
    assert!(
        target(&st, "web")
            .unwrap()
            .message
            .as_deref()
            .unwrap()
            .contains("unset keys no longer in the bundle: EMPTY, JWT_SECRET"),
        "{st:?}"
    );
    // Every request carried the token; none asked to delete a secret.
    let log = api.log().await;
    assert!(log.iter().all(|r| r["token_ok"] == json!(true)), "{log:?}");
    assert!(log.iter().all(|r| r["method"] != "DELETE"), "{log:?}");

    // Dropping the last key of another bundle's... no: taking THEIRS into the bundle makes it
    // managed (the bundle declares it); leaving it out again unsets it, as any managed key.
    e.secret("src", &[("ONLY", "1")]).await;
    e.wait("fly", 30, "only ONLY", |s| {
        fly_of(s, "web").managed_keys == ["ONLY"]
    })
    .await;
    assert_eq!(
        api.values("web").await,
        map(&[("ONLY", "1"), ("THEIRS", "not-ours")])
    );
}

#[tokio::test]
async fn fly_api_drift_is_seen_in_status_and_corrected() {
    let api = FlyApiStandIn::start().await;
    let token = fly_token();
    api.token(&token).await;
    api.app("web").await;
    let e = api_env("secretbundle-flyapi-drift", &api).await;
    e.secret("src", &[("A", "alpha"), ("B", "beta")]).await;
    e.secret("fly", &[("token", &token)]).await;
    e.bundle(
        "fly",
        json!({
            "sources": [{"secretName": "src"}],
            "targets": {"flyApps": [{"app": "web", "tokenSecretRef": {"name": "fly", "key": "token"}}]},
            "refreshInterval": "10s",
        }),
    )
    .await;
    let st = e
        .wait("fly", 30, "web staged", |s| {
            state_of(s, "web") == Some(BundleTargetState::Staged)
        })
        .await;
    assert!(fly_of(&st, "web").drifted_keys.is_empty());
    let sets_before = api
        .log_for("web")
        .await
        .iter()
        .filter(|(m, _)| m == "POST")
        .count();
    assert_eq!(sets_before, 1);
    // Someone changes B on Fly.io.
    api.set_as_someone_else(&token, "web", json!({"B": "tampered"}))
        .await;
    let st = e
        .wait("fly", 40, "drift seen and corrected", |s| {
            fly_of(s, "web").drifted_keys == ["B"]
        })
        .await;
    assert_eq!(state_of(&st, "web"), Some(BundleTargetState::Staged));
    assert_eq!(
        api.values("web").await,
        map(&[("A", "alpha"), ("B", "beta")])
    );
    assert!(fly_of(&st, "web").drift_seen_at.is_some());
    let msg = target(&st, "web").unwrap().message.clone().unwrap();
    assert!(
        msg.contains("drift corrected: B changed or missing"),
        "{msg}"
    );
    assert!(
        e.event_reasons("fly")
            .await
            .iter()
            .any(|(r, m)| r == "FlyDrift" && m.contains("B changed or missing"))
    );
    // A later check with nothing changed sets nothing (one list per refresh, no POST).
    let posts = |l: &[(String, u16)]| l.iter().filter(|(m, _)| m == "POST").count();
    let after = posts(&api.log_for("web").await);
    let gets = api.log_for("web").await.len() - after;
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.log_for("web").await.len() - posts(&api.log_for("web").await) <= gets {
        assert!(Instant::now() < deadline, "no check after the correction");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(posts(&api.log_for("web").await), after);
    // A removed key is drift too: set again.
    let d = api.digests(&token, "web").await;
    assert_eq!(d.len(), 2);
    api.set_as_someone_else(&token, "web", json!({"A": null}))
        .await;
    e.wait("fly", 40, "A set again", |s| {
        fly_of(s, "web").drifted_keys == ["A"]
    })
    .await;
    assert_eq!(
        api.values("web").await,
        map(&[("A", "alpha"), ("B", "beta")])
    );
}

#[tokio::test]
async fn fly_api_errors_have_clear_reasons_and_throttling_is_retried() {
    let api = FlyApiStandIn::start().await;
    let token = fly_token();
    let refused = format!("FlyV1 fm2_REFUSED{}AAAA", std::process::id());
    api.token(&token).await;
    api.app("web").await;
    api.app("busy").await;
    api.app("flaky").await;
    api.app("strict").await;
    // busy: two 429s asking for a 1 s wait; flaky: one 500; strict: one 422.
    api.fault("busy", 429, 2, Some(1)).await;
    api.fault("flaky", 500, 1, None).await;
    api.fault("strict", 422, 1, None).await;
    let e = api_env("secretbundle-flyapi-errors", &api).await;
    e.secret("src", &[("A", "alpha")]).await;
    e.secret("fly", &[("token", &token)]).await;
    e.secret("bad", &[("token", &refused)]).await;
    e.bundle(
        "fly",
        json!({
            "sources": [{"secretName": "src"}],
            "targets": {"flyApps": [
                {"app": "web", "tokenSecretRef": {"name": "bad", "key": "token"}},
            ]},
        }),
    )
    .await;
    // 401: Failed, reason FlyUnauthorized, on the target and on Ready and Degraded.
    let st = e
        .wait("fly", 30, "unauthorized", |s| {
            reason_of(s, "web").as_deref() == Some("FlyUnauthorized")
        })
        .await;
    assert_eq!(state_of(&st, "web"), Some(BundleTargetState::Failed));
    let msg = target(&st, "web").unwrap().message.clone().unwrap();
    assert!(msg.contains("fly tokens create deploy -a web"), "{msg}");
    assert!(!msg.contains(&refused), "{msg}");
    assert_eq!(cond(&st, "Ready").unwrap().1, "FlyUnauthorized");
    assert_eq!(cond(&st, "Degraded").unwrap().1, "FlyUnauthorized");
    assert!(api.values("web").await.is_empty());
    assert!(
        e.event_reasons("fly")
            .await
            .iter()
            .any(|(r, _)| r == "FlyUnauthorized")
    );

    // 404 (no such app): Skipped, reason FlyAppNotFound; the others go through, the throttled
    // one after Fly's Retry-After, the failing one after the backoff.
    e.bundle(
        "fly",
        json!({
            "sources": [{"secretName": "src"}],
            "targets": {"flyApps": [
                {"app": "web", "tokenSecretRef": {"name": "fly", "key": "token"}},
                {"app": "ghost", "tokenSecretRef": {"name": "fly", "key": "token"}},
                {"app": "busy", "tokenSecretRef": {"name": "fly", "key": "token"}},
                {"app": "flaky", "tokenSecretRef": {"name": "fly", "key": "token"}},
                {"app": "strict", "tokenSecretRef": {"name": "fly", "key": "token"}},
            ]},
        }),
    )
    .await;
    let st = e
        .wait(
            "fly",
            60,
            "web, busy, flaky and strict staged, ghost skipped",
            |s| {
                ["web", "busy", "flaky", "strict"]
                    .iter()
                    .all(|a| state_of(s, a) == Some(BundleTargetState::Staged))
                    && state_of(s, "ghost") == Some(BundleTargetState::Skipped)
            },
        )
        .await;
    assert_eq!(reason_of(&st, "ghost").as_deref(), Some("FlyAppNotFound"));
    assert!(
        target(&st, "ghost")
            .unwrap()
            .message
            .as_deref()
            .unwrap()
            .contains("Fly.io app ghost does not exist")
    );
    assert_eq!(cond(&st, "Degraded").unwrap().1, "FlyAppNotFound");
    assert_eq!(cond(&st, "Ready").unwrap().0, "True");
    for app in ["web", "busy", "flaky", "strict"] {
        assert_eq!(api.values(app).await, map(&[("A", "alpha")]), "{app}");
        assert_eq!(reason_of(&st, app), None, "{app}");
    }
    let busy = api.log_for("busy").await;
    assert_eq!(
        busy.iter().filter(|(_, s)| *s == 429).count(),
        2,
        "{busy:?}"
    );
    assert!(
        busy.iter().any(|(m, s)| m == "POST" && *s == 200),
        "{busy:?}"
    );
    let flaky = api.log_for("flaky").await;
    assert_eq!(flaky.first(), Some(&("GET".to_string(), 500)), "{flaky:?}");
    let reasons = e.event_reasons("fly").await;
    for r in [
        "FlyThrottled",
        "FlyUnavailable",
        "FlyRejected",
        "FlyAppNotFound",
    ] {
        assert!(reasons.iter().any(|(x, _)| x == r), "{r}: {reasons:?}");
    }
    assert!(
        reasons
            .iter()
            .any(|(r, m)| r == "FlyThrottled" && m.contains("retried in 1s as it asked")),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn fly_api_canary_leaks_nowhere() {
    let logs = LogBuf::default();
    let subscriber = {
        let w = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_writer(move || w.clone())
            .with_ansi(false)
            .finish()
    };
    let _guard = tracing::subscriber::set_default(subscriber);
    // See a_canary_value_leaks_nowhere: a second dispatcher keeps callsite interest honest.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());

    let canary = format!(
        "CANARY{}x{}",
        std::process::id(),
        Timestamp::now().as_nanosecond()
    );
    let token = format!("FlyV1 fm2_TOKENCANARY{}x", Timestamp::now().as_nanosecond());
    let refused = format!(
        "FlyV1 fm2_REFUSEDCANARY{}x",
        Timestamp::now().as_nanosecond()
    );
    let api = FlyApiStandIn::start().await;
    api.token(&token).await;
    api.app("web").await;
    api.app("throttled").await;
    api.fault("throttled", 429, 3, Some(1)).await;
    let e = api_env("secretbundle-flyapi-canary", &api).await;
    let quoted = format!("pre \"{canary}\" $post\nsecond line {canary}");
    e.secret("src", &[("CANARY", &canary), ("QUOTED", &quoted)])
        .await;
    e.secret("fly", &[("token", &token)]).await;
    e.secret("bad", &[("token", &refused)]).await;
    e.bundle(
        "leaky",
        json!({
            "sources": [{"secretName": "src"}],
            "targets": {"flyApps": [
                {"app": "web", "tokenSecretRef": {"name": "fly", "key": "token"}},
                {"app": "ghost", "tokenSecretRef": {"name": "fly", "key": "token"}},
                {"app": "locked", "tokenSecretRef": {"name": "bad", "key": "token"}},
                {"app": "throttled", "tokenSecretRef": {"name": "fly", "key": "token"}},
            ]},
        }),
    )
    .await;
    e.wait("leaky", 60, "every path taken", |s| {
        state_of(s, "web") == Some(BundleTargetState::Staged)
            && state_of(s, "ghost") == Some(BundleTargetState::Skipped)
            && state_of(s, "locked") == Some(BundleTargetState::Failed)
            && state_of(s, "throttled") == Some(BundleTargetState::Staged)
    })
    .await;
    // Sanity: the canary did travel where it should.
    assert_eq!(api.values("web").await.get("CANARY"), Some(&canary));

    let mut places: Vec<(String, String)> = vec![(
        "operator logs".into(),
        String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string(),
    )];
    assert!(
        places[0].1.contains("FlyThrottled"),
        "logs were not captured"
    );
    for ev in e.events().await {
        places.push((
            format!("event {}", ev.metadata.name.clone().unwrap_or_default()),
            serde_json::to_string(&ev).unwrap(),
        ));
    }
    for b in e.bundles.list(&ListParams::default()).await.unwrap() {
        places.push((
            format!(
                "SecretBundle {}",
                b.metadata.name.clone().unwrap_or_default()
            ),
            serde_json::to_string(&b).unwrap(),
        ));
    }
    places.push((
        "stand-in request log".into(),
        serde_json::to_string(&api.log().await).unwrap(),
    ));
    let token_body = token.trim_start_matches("FlyV1 ").to_string();
    let refused_body = refused.trim_start_matches("FlyV1 ").to_string();
    for (place, text) in &places {
        for (what, secret) in [
            ("canary", canary.as_str()),
            ("token", token_body.as_str()),
            ("refused token", refused_body.as_str()),
        ] {
            assert!(
                !text.contains(secret),
                "the {what} leaked into {place}: {}",
                text.lines()
                    .filter(|l| l.contains(secret))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    assert!(places.len() > 4, "{}", places.len());
}

/// The operator binary as shipped: with no `--fly-method` it pushes through the API
/// (`--fly-api-url`), and no flyctl exists anywhere it could run.
#[tokio::test]
async fn the_operator_pushes_through_the_api_by_default_without_flyctl() {
    let api = FlyApiStandIn::start().await;
    let token = fly_token();
    api.token(&token).await;
    api.app("web").await;
    let client = support::client().await;
    let ns = support::namespace(&client, "secretbundle-flyapi-op").await;
    let mut op = support::Operator::start(
        &ns,
        "http://127.0.0.1:9",
        &["--fly-api-url", &api.url, "--flyctl", "/nonexistent/flyctl"],
    );
    let e = Env {
        bundles: Api::namespaced(client.clone(), &ns),
        sbx: Api::namespaced(client.clone(), &ns),
        secrets: Api::namespaced(client.clone(), &ns),
        client: client.clone(),
        ns: ns.clone(),
        fly: tempfile::tempdir().unwrap(),
        _stop: tokio::sync::oneshot::channel().0,
    };
    e.secret("src", &[("A", "alpha-value"), ("B", "beta-value")])
        .await;
    e.secret("fly", &[("token", &token)]).await;
    e.bundle(
        "fly",
        json!({
            "sources": [{"secretName": "src"}],
            "targets": {"flyApps": [{"app": "web", "tokenSecretRef": {"name": "fly", "key": "token"}}]},
        }),
    )
    .await;
    let st = e
        .wait("fly", 60, "web staged by the operator", |s| {
            state_of(s, "web") == Some(BundleTargetState::Staged)
        })
        .await;
    assert_eq!(
        api.values("web").await,
        map(&[("A", "alpha-value"), ("B", "beta-value")])
    );
    assert_eq!(fly_of(&st, "web").managed_keys, ["A", "B"]);
    op.kill();
    let logs = op.logs();
    assert!(
        !logs.contains("/nonexistent/flyctl"),
        "flyctl was run:\n{logs}"
    );
    for secret in ["alpha-value", token.trim_start_matches("FlyV1 ")] {
        assert!(
            !logs.contains(secret),
            "{secret} in the operator log:\n{logs}"
        );
    }
}
