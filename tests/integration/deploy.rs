//! SandboxDeploy end to end: the real operator binary, the shared control plane, a wrapped moto
//! endpoint per test and real agents with the fake docker; and the CI webhook.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use sandbox_operator::api::{
    DeployPhase, Sandbox, SandboxDeploy, SandboxDeployStatus, TargetPhase,
};
use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions};

use crate::fleet::Agent;
use crate::support::{self, Operator};

struct Fleet {
    client: kube::Client,
    ns: String,
    _ec2: Ec2Endpoint,
    op: Operator,
    agents: BTreeMap<String, Agent>,
    sbx: Api<Sandbox>,
    deploys: Api<SandboxDeploy>,
}

/// Starts `names.len()` sandboxes labelled `group=<group>`, each with its own agent at v1, and
/// waits until they are Ready.
async fn fleet(test: &str, groups: &[(&str, &[&str])], extra_args: &[&str]) -> Fleet {
    let client = support::client().await;
    let ns = support::namespace(&client, test).await;
    let ec2 = Ec2Endpoint::start(Ec2EndpointOptions::default())
        .await
        .unwrap();
    let ami = ec2.defaults().await.unwrap().ami;
    let op = Operator::start(&ns, &ec2.url(), extra_args);
    let sbx: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut agents = BTreeMap::new();
    for (group, names) in groups {
        for name in names.iter() {
            let agent = Agent::start("v1", 0).await;
            let secret: Secret = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("{name}-token")}, "stringData": {"token": agent.token},
            }))
            .unwrap();
            secrets
                .create(&PostParams::default(), &secret)
                .await
                .unwrap();
            let manifest = serde_json::json!({
                "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "Sandbox",
                "metadata": {"name": name, "labels": {"group": group}},
                "spec": {
                    "environment": "staging", "instanceType": "t3.large", "launch": {"imageId": ami},
                    "agent": {"url": agent.url, "tokenSecretRef": {"name": format!("{name}-token"), "key": "token"}, "probeInterval": "1s", "timeout": "1s"},
                },
            });
            sbx.patch(
                name,
                &PatchParams::apply("gitops").force(),
                &Patch::Apply(&manifest),
            )
            .await
            .unwrap();
            agents.insert(name.to_string(), agent);
        }
    }
    let deploys = Api::namespaced(client.clone(), &ns);
    let f = Fleet {
        client,
        ns,
        _ec2: ec2,
        op,
        agents,
        sbx,
        deploys,
    };
    for name in f.agents.keys() {
        f.wait_sandbox(name, 90, "Ready", |s| {
            s.status.as_ref().is_some_and(|st| {
                st.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .await;
    }
    f
}

impl Fleet {
    async fn wait_sandbox(
        &self,
        name: &str,
        secs: u64,
        what: &str,
        f: impl Fn(&Sandbox) -> bool,
    ) -> Sandbox {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.sbx.get(name).await.unwrap();
            if f(&s) {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: timed out waiting for {what}: {:?}\n{}",
                s.status,
                self.op.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn create(&self, name: &str, tag: &str, group: &str, extra: serde_json::Value) {
        let mut spec = serde_json::json!({"image": {"tag": tag}, "selector": {"matchLabels": {"group": group}}});
        merge(&mut spec, extra);
        let d: SandboxDeploy = serde_json::from_value(serde_json::json!({
            "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "SandboxDeploy", "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap();
        self.deploys
            .create(&PostParams::default(), &d)
            .await
            .unwrap();
    }

    async fn wait(
        &self,
        name: &str,
        secs: u64,
        what: &str,
        f: impl Fn(&SandboxDeployStatus) -> bool,
    ) -> SandboxDeployStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
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
                std::time::Instant::now() < deadline,
                "{name}: timed out waiting for {what}: {}\n{}",
                serde_json::to_string_pretty(&st).unwrap(),
                self.op.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn annotate(&self, name: &str, key: &str, value: &str) {
        let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
        self.deploys
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    async fn spec_tag(&self, name: &str) -> Option<String> {
        self.sbx.get(name).await.unwrap().spec.image.map(|i| i.tag)
    }

    async fn events(&self, name: &str) -> Vec<String> {
        let api: Api<k8s_openapi::api::core::v1::Event> =
            Api::namespaced(self.client.clone(), &self.ns);
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(name))
            .map(|e| e.reason.unwrap_or_default())
            .collect()
    }
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (a.as_object_mut(), b) {
        for (k, v) in b {
            a.insert(k, v);
        }
    }
}

fn phase(st: &SandboxDeployStatus, name: &str) -> Option<TargetPhase> {
    st.targets.iter().find(|t| t.name == name).map(|t| t.phase)
}

#[tokio::test]
async fn five_sandboxes_roll_in_waves_of_two() {
    let f = fleet("rollout", &[("web", &["w1", "w2", "w3", "w4", "w5"])], &[]).await;
    f.create(
        "web-v2",
        "v2",
        "web",
        serde_json::json!({"strategy": {"maxUnavailable": 2}}),
    )
    .await;
    // Watch the rollout: never more than two targets in flight.
    let mut max_in_flight = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let st = loop {
        let st = f
            .deploys
            .get("web-v2")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        let flying = st
            .targets
            .iter()
            .filter(|t| {
                matches!(
                    t.phase,
                    TargetPhase::Draining | TargetPhase::Deploying | TargetPhase::Verifying
                )
            })
            .count();
        max_in_flight = max_in_flight.max(flying);
        if st.phase == Some(DeployPhase::Succeeded) {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rollout did not finish: {st:?}\n{}",
            f.op.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        max_in_flight <= 2,
        "{max_in_flight} targets deployed at once"
    );
    assert_eq!((st.total, st.updated, st.failed), (5, 5, 0));
    let waves: Vec<i32> = st.targets.iter().map(|t| t.wave.unwrap()).collect();
    assert_eq!(waves, vec![1, 1, 2, 2, 3]);
    assert!(
        st.targets
            .iter()
            .all(|t| t.from_tag.as_deref() == Some("v1"))
    );
    assert!(st.started_at.is_some() && st.finished_at.is_some());
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Complete" && c.status == "True")
    );
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
    for (name, agent) in &f.agents {
        assert!(
            agent.docker_calls().contains("up tag=v2"),
            "{name} never ran v2"
        );
        let s = f.sbx.get(name).await.unwrap();
        assert_eq!(
            s.status.unwrap().agent.unwrap().image_tag.as_deref(),
            Some("v2")
        );
        // The deploy's own field manager owns image.tag.
        let managers: Vec<String> = s
            .metadata
            .managed_fields
            .unwrap_or_default()
            .iter()
            .filter(|m| {
                m.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.pointer("/f:spec/f:image/f:tag").is_some())
            })
            .filter_map(|m| m.manager.clone())
            .collect();
        assert_eq!(
            managers,
            vec!["sandbox-operator-deploy".to_string()],
            "{name}"
        );
    }
    let events = f.events("web-v2").await;
    assert_eq!(
        events.iter().filter(|r| *r == "WaveStarted").count(),
        3,
        "{events:?}"
    );
    // The ledger keeps the deploy's history, read through the report.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox-operator"))
            .args(["report", "deploys", "--ledger", &f.op.ledger, "-o", "json"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains("web-v2") && text.contains("Succeeded") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no deploy history in the ledger: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Printer columns.
    let out = support::kubectl(&["get", "sbxdeploy", "web-v2", "-n", &f.ns], None);
    let text = support::text(&out);
    assert!(
        text.contains("v2") && text.contains("Succeeded") && text.contains(" 5 "),
        "{text}"
    );
}

/// The figure for the note: the makespan of a 20-sandbox rollout with maxUnavailable 5 and a
/// fixed per-sandbox deploy time, beside waves x that time. Printed, not asserted (timings are
/// benchmarks' business); the test checks only that the rollout is right.
#[tokio::test]
async fn twenty_sandboxes_in_four_waves_makespan() {
    let names: Vec<String> = (1..=20).map(|i| format!("m{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let f = fleet("makespan", &[("m", &refs)], &[]).await;
    let per_sandbox = 8;
    for a in f.agents.values() {
        std::fs::write(
            a.dir.join("docker").join("pull-seconds"),
            per_sandbox.to_string(),
        )
        .unwrap();
    }
    let start = std::time::Instant::now();
    f.create(
        "m-v2",
        "v2",
        "m",
        serde_json::json!({"strategy": {"maxUnavailable": 5}}),
    )
    .await;
    let st = f
        .wait("m-v2", 600, "Succeeded", |s| {
            s.phase == Some(DeployPhase::Succeeded)
        })
        .await;
    let makespan = start.elapsed().as_secs_f64();
    assert_eq!((st.updated, st.total), (20, 20));
    assert_eq!(st.targets.iter().filter_map(|t| t.wave).max(), Some(4));
    let bound = 4.0 * per_sandbox as f64;
    println!(
        "FIGURE rollout 20 sandboxes, maxUnavailable 5, {per_sandbox} s per sandbox: makespan {makespan:.1} s, waves x time {bound:.0} s, ratio {:.2}",
        makespan / bound
    );
}

#[tokio::test]
async fn a_failing_target_halts_or_continues_and_is_rolled_back_then_retried() {
    let f = fleet(
        "failures",
        &[("halt", &["h1", "h2", "h3"]), ("cont", &["c1", "c2", "c3"])],
        &[],
    )
    .await;
    f.agents["h1"].fail_health_for("v3");
    f.agents["c1"].fail_health_for("v3");
    f.create("halt-v3", "v3", "halt", serde_json::json!({"strategy": {"maxUnavailable": 1, "failurePolicy": "Halt", "autoRollback": true}})).await;
    f.create("cont-v3", "v3", "cont", serde_json::json!({"strategy": {"maxUnavailable": 1, "failurePolicy": "Continue", "autoRollback": false}})).await;

    let st = f
        .wait("halt-v3", 120, "Failed", |s| {
            s.phase == Some(DeployPhase::Failed)
        })
        .await;
    assert_eq!(phase(&st, "h1"), Some(TargetPhase::RolledBack));
    assert_eq!(
        phase(&st, "h2"),
        Some(TargetPhase::Pending),
        "Halt starts no new wave"
    );
    assert_eq!(phase(&st, "h3"), Some(TargetPhase::Pending));
    assert_eq!(
        f.spec_tag("h1").await.as_deref(),
        Some("v1"),
        "autoRollback sets the previous tag back"
    );
    assert_eq!(f.spec_tag("h2").await, None);
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Failed" && c.status == "True")
    );
    assert!(
        f.events("halt-v3")
            .await
            .iter()
            .any(|r| r == "TargetRolledBack")
    );

    let st = f
        .wait("cont-v3", 120, "finished", |s| {
            s.phase == Some(DeployPhase::Failed)
        })
        .await;
    assert_eq!(phase(&st, "c1"), Some(TargetPhase::Failed));
    assert_eq!(
        phase(&st, "c2"),
        Some(TargetPhase::Succeeded),
        "Continue goes on"
    );
    assert_eq!(phase(&st, "c3"), Some(TargetPhase::Succeeded));
    assert_eq!(
        f.spec_tag("c1").await.as_deref(),
        Some("v3"),
        "no rollback without autoRollback"
    );
    assert_eq!((st.updated, st.failed), (2, 1));

    // Retry after fixing the cause: only the failed target is redone, then the rest go on.
    std::fs::remove_file(f.agents["h1"].dir.join("docker").join("unhealthy-tags")).unwrap();
    let ups_before = |n: &str| {
        f.agents[n]
            .docker_calls()
            .lines()
            .filter(|l| l.starts_with("up tag=v3"))
            .count()
    };
    let c2_before = ups_before("c2");
    f.annotate("halt-v3", "fleet.valet.dev/retry", "1").await;
    let st = f
        .wait("halt-v3", 180, "Succeeded after retry", |s| {
            s.phase == Some(DeployPhase::Succeeded)
        })
        .await;
    assert_eq!((st.updated, st.failed), (3, 0));
    assert_eq!(st.last_retry.as_deref(), Some("1"));
    // The same retry value again changes nothing.
    f.annotate("halt-v3", "fleet.valet.dev/retry", "1").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        f.deploys
            .get("halt-v3")
            .await
            .unwrap()
            .status
            .unwrap()
            .phase,
        Some(DeployPhase::Succeeded)
    );
    assert_eq!(
        ups_before("c2"),
        c2_before,
        "the other deploy's targets were not touched"
    );
}

#[tokio::test]
async fn approval_gate_abort_supersede_history_and_empty_selector() {
    let f = fleet(
        "gates",
        &[("g", &["g1", "g2"])],
        &["--deploy-history-limit", "3"],
    )
    .await;
    // Approval: nothing moves while paused.
    f.create("gated", "v2", "g", serde_json::json!({"paused": true}))
        .await;
    let st = f
        .wait("gated", 30, "AwaitingApproval", |s| {
            s.phase == Some(DeployPhase::AwaitingApproval)
        })
        .await;
    assert!(st.targets.is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(f.spec_tag("g1").await, None);
    // Abort before it starts.
    f.create("aborted", "v9", "g", serde_json::json!({"paused": true}))
        .await;
    f.wait("aborted", 30, "AwaitingApproval", |s| {
        s.phase == Some(DeployPhase::AwaitingApproval)
    })
    .await;
    f.annotate("aborted", "fleet.valet.dev/abort", "true").await;
    f.wait("aborted", 30, "Aborted", |s| {
        s.phase == Some(DeployPhase::Aborted)
    })
    .await;
    // Approve the first.
    let patch = serde_json::json!({"spec": {"paused": false}});
    f.deploys
        .patch("gated", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    f.wait("gated", 120, "Succeeded", |s| {
        s.phase == Some(DeployPhase::Succeeded)
    })
    .await;
    assert_eq!(f.spec_tag("g1").await.as_deref(), Some("v2"));

    // Supersede: an older deploy stuck draining g1 (a worker stays busy) loses both sandboxes to
    // a newer one.
    f.agents["g1"].set_active(1);
    // Wait until the Sandbox controller has seen the busy worker, so the drain really waits.
    f.wait_sandbox("g1", 60, "one active worker", |s| {
        s.status
            .as_ref()
            .and_then(|st| st.agent.as_ref())
            .and_then(|a| a.active_workers)
            == Some(1)
    })
    .await;
    f.create(
        "older",
        "v3",
        "g",
        serde_json::json!({"strategy": {"maxUnavailable": 1}}),
    )
    .await;
    f.wait("older", 60, "g1 draining", |s| {
        phase(s, "g1") == Some(TargetPhase::Draining)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.create(
        "newer",
        "v4",
        "g",
        serde_json::json!({"strategy": {"maxUnavailable": 2}}),
    )
    .await;
    let st = f
        .wait("older", 60, "Superseded", |s| {
            s.phase == Some(DeployPhase::Superseded)
        })
        .await;
    assert_eq!(phase(&st, "g1"), Some(TargetPhase::Superseded));
    assert_eq!(phase(&st, "g2"), Some(TargetPhase::Superseded));
    f.agents["g1"].set_active(0);
    f.wait("newer", 120, "Succeeded", |s| {
        s.phase == Some(DeployPhase::Succeeded)
    })
    .await;
    assert_eq!(f.spec_tag("g2").await.as_deref(), Some("v4"));

    // A selector that matches nothing: Succeeded with zero targets, and it says so.
    f.create("nobody", "v5", "no-such-group", serde_json::json!({}))
        .await;
    let st = f
        .wait("nobody", 30, "Succeeded", |s| {
            s.phase == Some(DeployPhase::Succeeded)
        })
        .await;
    assert_eq!(st.total, 0);
    assert!(st.message.unwrap().contains("matched no sandboxes"));

    // History: at most 3 finished deploys are kept, the oldest go first. (Times have one-second
    // resolution: space the deploys out so "oldest" is well defined.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for i in 0..3 {
        f.create(
            &format!("empty-{i}"),
            "v6",
            "no-such-group",
            serde_json::json!({}),
        )
        .await;
        f.wait(&format!("empty-{i}"), 30, "Succeeded", |s| {
            s.phase == Some(DeployPhase::Succeeded)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let names = || async {
        let mut n: Vec<String> = f
            .deploys
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(|d| d.metadata.name.clone().unwrap())
            .collect();
        n.sort();
        n
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while names().await.len() > 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "history not pruned: {:?}",
            names().await
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(names().await, vec!["empty-0", "empty-1", "empty-2"]);
}

fn sign(secret: &str, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn webhook_creates_one_deploy_per_delivery_and_refuses_bad_calls() {
    let client = support::client().await;
    let ns = support::namespace(&client, "webhook").await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "webhook-secret-0123456789";
    std::fs::write(dir.path().join("secret"), format!("{secret}\n")).unwrap();
    let config = format!(
        "webhook:\n  secretFile: {}\n  maxSkew: 5m\n  maxBodyBytes: 4096\n  environments:\n    staging:\n      namespace: {ns}\n      selector: {{environment: staging}}\n      strategy: {{maxUnavailable: 2}}\n      autoDeploy: false\n",
        dir.path().join("secret").display()
    );
    std::fs::write(dir.path().join("config.yaml"), config).unwrap();
    let ec2 = Ec2Endpoint::start(Ec2EndpointOptions::default())
        .await
        .unwrap();
    let op = Operator::start(
        &ns,
        &ec2.url(),
        &["--config", dir.path().join("config.yaml").to_str().unwrap()],
    );
    let url = format!(
        "http://{}{}",
        op.http,
        sandbox_operator::operator::webhook::PATH
    );
    let http = reqwest::Client::new();
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let payload = |tag: &str, ts: &str| {
        serde_json::to_vec(&serde_json::json!({
            "event": "ghosthands.deploy_ready", "image": "registry.example/ghosthands:abc", "image_tag": tag,
            "commit_sha": "abc123def456", "commit_message": "fix: things", "branch": "main",
            "repository": "org/repo", "run_id": "42", "run_url": "https://ci.example/run/42", "timestamp": ts,
        }))
        .unwrap()
    };
    let post = |body: Vec<u8>, sig: Option<String>, event: &str, env: &str| {
        let mut r = http
            .post(&url)
            .header("content-type", "application/json")
            .header("x-gh-event", event)
            .header("x-gh-environment", env);
        if let Some(s) = sig {
            r = r.header("x-gh-webhook-signature", s);
        }
        r.body(body).send()
    };
    // The server may take a moment to come up.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("http://{}/healthz", op.http))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "operator HTTP never came up:\n{}",
            op.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = payload("abc123", &now);
    let r = post(
        body.clone(),
        Some(sign(secret, &body)),
        "deploy_ready",
        "staging",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let deploys: Api<SandboxDeploy> = Api::namespaced(client.clone(), &ns);
    let d = deploys.get("staging-abc123").await.unwrap();
    assert!(
        d.spec.paused,
        "autoDeploy off: created paused, awaiting approval"
    );
    assert_eq!(
        d.spec.source.as_ref().unwrap().commit_sha.as_deref(),
        Some("abc123def456")
    );
    assert_eq!(
        d.spec.strategy.max_unavailable,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(2)
    );
    // The same delivery again: a duplicate, nothing new.
    let r = post(
        body.clone(),
        Some(sign(secret, &body)),
        "deploy_ready",
        "staging",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["status"],
        "duplicate"
    );

    let stale = payload("def456", "2020-01-01T00:00:00Z");
    // (what, body, signature, event, environment, expected status)
    type Case = (
        &'static str,
        Vec<u8>,
        Option<String>,
        &'static str,
        &'static str,
        u16,
    );
    let cases: Vec<Case> = vec![
        (
            "bad signature",
            payload("bad1", &now),
            Some(sign("wrong", &payload("bad1", &now))),
            "deploy_ready",
            "staging",
            401,
        ),
        (
            "missing signature",
            payload("bad2", &now),
            None,
            "deploy_ready",
            "staging",
            401,
        ),
        (
            "stale timestamp",
            stale.clone(),
            Some(sign(secret, &stale)),
            "deploy_ready",
            "staging",
            400,
        ),
        (
            "unknown event",
            payload("bad3", &now),
            Some(sign(secret, &payload("bad3", &now))),
            "push",
            "staging",
            400,
        ),
        (
            "unknown environment",
            payload("bad4", &now),
            Some(sign(secret, &payload("bad4", &now))),
            "deploy_ready",
            "qa",
            404,
        ),
        (
            "malformed JSON",
            b"{not json".to_vec(),
            Some(sign(secret, b"{not json")),
            "deploy_ready",
            "staging",
            400,
        ),
        (
            "oversized body",
            vec![b' '; 8192],
            Some(sign(secret, &[b' '; 8192])),
            "deploy_ready",
            "staging",
            413,
        ),
    ];
    for (what, body, sig, event, env, want) in cases {
        let r = post(body, sig, event, env).await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, want, "{what}: {text}");
        assert!(text.contains("error"), "{what}: the body says why: {text}");
    }
    let all = deploys.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(
        all.len(),
        1,
        "refused calls created deploys: {:?}",
        all.iter()
            .map(|d| d.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    assert!(
        !op.logs().contains(secret),
        "the webhook secret reached the log"
    );
}

/// Sends a request whose body stops arriving after `sent` of `declared` bytes and returns the
/// raw answer (status line, headers, body), read until the server closes the connection.
async fn stalled_post(
    addr: std::net::SocketAddr,
    path: &str,
    declared: usize,
    sent: &[u8],
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(sent).await.unwrap();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    assert!(
        r.is_ok(),
        "no answer within 30 s: {}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test]
async fn webhook_refusals_are_json_at_every_layer_and_a_replay_never_recreates_a_deleted_deploy() {
    let client = support::client().await;
    let ns = support::namespace(&client, "webhook-edges").await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "webhook-secret-edges-9876543210";
    std::fs::write(dir.path().join("secret"), format!("{secret}\n")).unwrap();
    let config = format!(
        "webhook:\n  secretFile: {}\n  maxSkew: 5m\n  maxBodyBytes: 4096\n  requestTimeout: 2s\n  environments:\n    staging:\n      namespace: {ns}\n      selector: {{environment: staging}}\n      autoDeploy: false\n",
        dir.path().join("secret").display()
    );
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, config).unwrap();
    let ec2 = Ec2Endpoint::start(Ec2EndpointOptions::default())
        .await
        .unwrap();
    let with_config = ["--config", config_path.to_str().unwrap()];
    let mut op = Operator::start(&ns, &ec2.url(), &with_config);
    let http = reqwest::Client::new();
    let up = |op: &Operator| {
        let url = format!("http://{}/healthz", op.http);
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while reqwest::get(&url).await.is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "operator HTTP never came up"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    up(&op).await;
    let url = |op: &Operator, path: &str| format!("http://{}{path}", op.http);
    let payload = |tag: &str, ts: &str| {
        serde_json::to_vec(&serde_json::json!({
            "event": "ghosthands.deploy_ready", "image_tag": tag, "commit_sha": "abc123",
            "timestamp": ts,
        }))
        .unwrap()
    };
    let deliver = |op: &Operator, body: Vec<u8>| {
        http.post(url(op, sandbox_operator::operator::webhook::PATH))
            .header("content-type", "application/json")
            .header("x-gh-event", "deploy_ready")
            .header("x-gh-environment", "staging")
            .header("x-gh-webhook-signature", sign(secret, &body))
            .body(body)
            .send()
    };
    /// The status and the JSON body; panics when the body is not JSON.
    async fn json(r: reqwest::Response) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{status}: the body is not JSON ({e}): {text:?}"));
        (status, headers, v)
    }

    // ---- A wrong method: 405, JSON, Allow: POST. ----
    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let r = http
            .request(
                method.clone(),
                url(&op, sandbox_operator::operator::webhook::PATH),
            )
            .send()
            .await
            .unwrap();
        let (status, headers, v) = json(r).await;
        assert_eq!(status, 405, "{method}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("POST"),
            "{method}: {v}"
        );
        assert_eq!(headers.get("allow").unwrap(), "POST");
    }
    // ---- An unknown path under the webhook prefix: 404, JSON. ----
    for path in [
        "/api/v1/webhooks/ghosthands/undeploy",
        "/api/v1/webhooks/other",
        "/api/v1/webhooks",
    ] {
        let r = http.post(url(&op, path)).body("{}").send().await.unwrap();
        let (status, _, v) = json(r).await;
        assert_eq!(status, 404, "{path}: {v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains(sandbox_operator::operator::webhook::PATH),
            "{path}: {v}"
        );
    }
    // ---- Bodies above the limit: 413, JSON, whatever their size (the old 1 MiB layer
    // answered plain text above 1 MiB). ----
    for size in [4097usize, 2 << 20] {
        let body = vec![b' '; size];
        let r = deliver(&op, body).await.unwrap();
        let (status, _, v) = json(r).await;
        assert_eq!(status, 413, "{size} bytes: {v}");
        assert!(v["error"].as_str().unwrap().contains("4096"), "{v}");
    }
    // ---- A body that stops arriving: 408 after requestTimeout, JSON, connection closed. ----
    let t0 = std::time::Instant::now();
    let raw = stalled_post(
        op.http,
        sandbox_operator::operator::webhook::PATH,
        100,
        b"{\"image_",
    )
    .await;
    let waited = t0.elapsed();
    assert!(raw.starts_with("HTTP/1.1 408"), "{raw}");
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {raw}"));
    assert!(v["error"].as_str().unwrap().contains("2s"), "{v}");
    assert!(
        waited >= Duration::from_millis(1900),
        "answered before the timeout: {waited:?}"
    );
    assert!(
        raw.to_ascii_lowercase().contains("connection: close"),
        "{raw}"
    );

    // ---- A delivery, its deploy deleted, the delivery replayed: never created again. ----
    let deploys: Api<SandboxDeploy> = Api::namespaced(client.clone(), &ns);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let body = payload("edge123", &now);
    let (status, _, v) = json(deliver(&op, body.clone()).await.unwrap()).await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["name"], "staging-edge123");
    deploys
        .delete("staging-edge123", &Default::default())
        .await
        .unwrap();
    support::eventually(30, "the SandboxDeploy deleted", || {
        let deploys = deploys.clone();
        async move {
            deploys
                .get_opt("staging-edge123")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;
    let replayed = |op: &Operator| {
        let f = deliver(op, body.clone());
        async move {
            let (status, _, v) = json(f.await.unwrap()).await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["status"], "duplicate", "{v}");
            assert!(
                v["reason"].as_str().unwrap().contains("already received"),
                "{v}"
            );
        }
    };
    replayed(&op).await;
    // The record lives apart from the deploy, in the environment's namespace.
    let records: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), &ns);
    let data = records
        .get(sandbox_operator::operator::webhook::DELIVERIES)
        .await
        .unwrap()
        .data
        .unwrap();
    let record: sandbox_operator::operator::webhook::Delivery = serde_json::from_str(
        &data[&sandbox_operator::operator::webhook::delivery_key("staging", &body)],
    )
    .unwrap();
    assert_eq!(record.state, "delivered");
    assert_eq!(record.deploy, "staging-edge123");
    // The record outlives the process: after a restart the replay is still refused.
    op = op.restart(&ns, &ec2.url(), &with_config);
    up(&op).await;
    replayed(&op).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        deploys.get_opt("staging-edge123").await.unwrap().is_none(),
        "a replay recreated the deleted SandboxDeploy"
    );
    // A new delivery of the same tag (CI ran again: a new timestamp) is not a replay.
    let again = payload("edge123", &k8s_openapi::jiff::Timestamp::now().to_string());
    assert_ne!(again, body);
    let (status, _, v) = json(deliver(&op, again).await.unwrap()).await;
    assert_eq!(status, 202, "{v}");
    assert!(deploys.get_opt("staging-edge123").await.unwrap().is_some());

    // ---- Not configured: the prefix still answers JSON. ----
    op = op.restart(&ns, &ec2.url(), &[]);
    up(&op).await;
    let r = http
        .post(url(&op, sandbox_operator::operator::webhook::PATH))
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, _, v) = json(r).await;
    assert_eq!(status, 404, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("not configured"),
        "{v}"
    );
    assert!(
        !op.logs().contains(secret),
        "the webhook secret reached the log"
    );
}

/// Waits for the operator's HTTP server.
async fn http_up(op: &Operator) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("http://{}/healthz", op.http))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "operator HTTP never came up:\n{}",
            op.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The status and JSON body of an answer; panics when the body is not JSON.
async fn json_answer(r: reqwest::Response) -> (u16, serde_json::Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status}: the body is not JSON ({e}): {text:?}"));
    (status, v)
}

/// Both seeds' senders as they send (seed 004 section 4.3: the event in the body and the
/// header, no X-GH-Environment, `image_latest`; seed 001 section 7: X-GH-Environment and an
/// `environment` field, no timestamp), with the secret in a Kubernetes Secret (`secretRef`),
/// through the real binary; the status URL; and a signed delivery for an environment the config
/// lacks.
#[tokio::test]
async fn webhook_accepts_both_seed_senders_with_a_secret_ref_and_answers_status() {
    let client = support::client().await;
    let ns = support::namespace(&client, "webhook-seeds").await;
    let secret = "seed-shared-secret-4242424242";
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let s: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ci-webhook"}, "stringData": {"secret": secret},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "webhook:\n  secretRef: {{namespace: {ns}, name: ci-webhook, key: secret}}\n  defaultEnvironment: staging\n  environments:\n    staging:\n      namespace: {ns}\n      selector: {{environment: staging}}\n      autoDeploy: false\n    production:\n      namespace: {ns}\n      selector: {{environment: prod}}\n      autoDeploy: false\n"
    );
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, config).unwrap();
    let ec2 = Ec2Endpoint::start(Ec2EndpointOptions::default())
        .await
        .unwrap();
    let op = Operator::start(
        &ns,
        &ec2.url(),
        &["--config", config_path.to_str().unwrap()],
    );
    http_up(&op).await;
    let http = reqwest::Client::new();
    let url = format!(
        "http://{}{}",
        op.http,
        sandbox_operator::operator::webhook::PATH
    );
    let deploys: Api<SandboxDeploy> = Api::namespaced(client.clone(), &ns);
    let post = |body: &[u8], key: &str, headers: &[(&str, &str)]| {
        let mut r = http
            .post(&url)
            .header("content-type", "application/json")
            .header("x-gh-webhook-signature", sign(key, body));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(body.to_vec()).send()
    };

    // ---- Seed 004, section 4.3, verbatim but for a timestamp of now. ----
    let seed004 = format!(
        r#"{{
  "event": "ghosthands.deploy_ready",
  "image": "123456789.dkr.ecr.us-east-1.amazonaws.com/ghosthands:abc123def",
  "image_tag": "abc123def",
  "image_latest": "123456789.dkr.ecr.us-east-1.amazonaws.com/ghosthands:latest",
  "commit_sha": "abc123def456789",
  "commit_message": "fix: resolve form filling timeout on Workday",
  "branch": "main",
  "repository": "WeKruit/GHOST-HANDS",
  "run_id": "12345678",
  "run_url": "https://github.com/WeKruit/GHOST-HANDS/actions/runs/12345678",
  "timestamp": "{}"
}}"#,
        k8s_openapi::jiff::Timestamp::now()
    );
    let (status, v) = json_answer(
        post(
            seed004.as_bytes(),
            secret,
            &[("x-gh-event", "deploy_ready")],
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["name"], "staging-abc123def", "{v}");
    assert_eq!(v["environment"], "staging", "the configured default: {v}");
    let status_path = v["status_path"].as_str().unwrap().to_string();
    assert_eq!(
        status_path,
        "/api/v1/webhooks/ghosthands/deploys/staging/staging-abc123def"
    );
    assert_eq!(
        v["status_url"].as_str().unwrap(),
        format!("http://{}{status_path}", op.http)
    );
    let d = deploys.get("staging-abc123def").await.unwrap();
    assert_eq!(d.spec.image.tag, "abc123def");
    assert_eq!(
        d.spec.image.repository.as_deref(),
        Some("123456789.dkr.ecr.us-east-1.amazonaws.com/ghosthands")
    );
    let src = d.spec.source.as_ref().unwrap();
    assert_eq!(src.run_id.as_deref(), Some("12345678"));
    assert_eq!(src.repository.as_deref(), Some("WeKruit/GHOST-HANDS"));
    assert!(d.spec.paused);

    // ---- Seed 001, section 7: X-GH-Environment and an environment field, no timestamp. ----
    let seed001 = br#"{"image":"123456789.dkr.ecr.us-east-1.amazonaws.com/ghosthands:0f1e2d3c","image_tag":"0f1e2d3c","commit_sha":"0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c","commit_message":"feat: new form filler","environment":"production"}"#;
    let seed001_headers = [
        ("x-gh-event", "deploy_ready"),
        ("x-gh-environment", "production"),
    ];
    let (status, v) = json_answer(post(seed001, secret, &seed001_headers).await.unwrap()).await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["name"], "production-0f1e2d3c", "{v}");
    assert!(
        deploys
            .get_opt("production-0f1e2d3c")
            .await
            .unwrap()
            .is_some()
    );
    // No timestamp: the record of its content refuses the replay, even once the deploy is gone.
    deploys
        .delete("production-0f1e2d3c", &Default::default())
        .await
        .unwrap();
    support::eventually(30, "the SandboxDeploy deleted", || {
        let deploys = deploys.clone();
        async move {
            deploys
                .get_opt("production-0f1e2d3c")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;
    let (status, v) = json_answer(post(seed001, secret, &seed001_headers).await.unwrap()).await;
    assert_eq!(
        (status, v["status"].as_str()),
        (200, Some("duplicate")),
        "{v}"
    );
    assert!(v["status_path"].as_str().is_some(), "{v}");
    assert!(
        deploys
            .get_opt("production-0f1e2d3c")
            .await
            .unwrap()
            .is_none()
    );
    let records: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), &ns);
    let data = records
        .get(sandbox_operator::operator::webhook::DELIVERIES)
        .await
        .unwrap()
        .data
        .unwrap();
    let record: sandbox_operator::operator::webhook::Delivery = serde_json::from_str(
        &data[&sandbox_operator::operator::webhook::delivery_key("production", seed001)],
    )
    .unwrap();
    assert_eq!(record.timestamp, None);
    let keep: k8s_openapi::jiff::Timestamp = record.keep_until.parse().unwrap();
    let days = k8s_openapi::jiff::Timestamp::now()
        .duration_until(keep)
        .as_secs()
        / 86400;
    assert!((29..=30).contains(&days), "kept {days} days: {record:?}");

    // ---- Signed with the right secret, for an environment the config lacks: 404 naming the
    // environment and the configured ones; nothing created, nothing recorded. ----
    let before = deploys
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .len();
    let qa = br#"{"event":"ghosthands.deploy_ready","image_tag":"qa1","environment":"qa"}"#;
    for headers in [
        &[("x-gh-event", "deploy_ready"), ("x-gh-environment", "qa")][..],
        &[][..],
    ] {
        let (status, v) = json_answer(post(qa, secret, headers).await.unwrap()).await;
        assert_eq!(status, 404, "{headers:?}: {v}");
        let e = v["error"].as_str().unwrap();
        assert!(
            e.contains("\"qa\"") && e.contains("production, staging"),
            "{e}"
        );
    }
    // Header and payload disagreeing (the header is not signed): 400.
    let (status, v) = json_answer(
        post(
            seed001,
            secret,
            &[
                ("x-gh-event", "deploy_ready"),
                ("x-gh-environment", "staging"),
            ],
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("disagree"), "{v}");
    // No event anywhere: 400.
    let no_event = br#"{"image_tag":"ne1","environment":"staging"}"#;
    let (status, v) = json_answer(post(no_event, secret, &[]).await.unwrap()).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("no event"), "{v}");
    let after = deploys
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .len();
    assert_eq!(before, after, "a refused delivery created a deploy");
    let data = records
        .get(sandbox_operator::operator::webhook::DELIVERIES)
        .await
        .unwrap()
        .data
        .unwrap();
    assert!(
        !data.contains_key(&sandbox_operator::operator::webhook::delivery_key("qa", qa)),
        "a refused delivery was recorded"
    );

    // ---- The status URL: signed over the path; 401 unsigned or wrongly signed; 404 for an
    // unknown deploy or environment; 405 for another method. ----
    let get = |path: String, sig: Option<String>| {
        let mut r = http.get(format!("http://{}{path}", op.http));
        if let Some(s) = sig {
            r = r.header("x-gh-webhook-signature", s);
        }
        r.send()
    };
    let (status, v) = json_answer(
        get(
            status_path.clone(),
            Some(sign(secret, status_path.as_bytes())),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["name"], "staging-abc123def");
    assert_eq!(v["tag"], "abc123def");
    assert_eq!(v["paused"], true);
    assert_eq!(v["done"], false, "a paused deploy is not finished: {v}");
    for k in ["phase", "total", "updated", "failed"] {
        assert!(!v[k].is_null(), "{k} missing: {v}");
    }
    // Once reconciled, the phase the SandboxDeploy's status has.
    support::eventually(60, "the status URL reports AwaitingApproval", || {
        let f = get(
            status_path.clone(),
            Some(sign(secret, status_path.as_bytes())),
        );
        async move {
            let (_, v) = json_answer(f.await.unwrap()).await;
            (v["phase"] == "AwaitingApproval" && v["observed"] == true).then_some(())
        }
    })
    .await;
    let unknown = "/api/v1/webhooks/ghosthands/deploys/staging/staging-nope".to_string();
    let other_env = "/api/v1/webhooks/ghosthands/deploys/qa/staging-abc123def".to_string();
    let cases: Vec<(&str, String, Option<String>, u16)> = vec![
        ("unsigned", status_path.clone(), None, 401),
        (
            "another secret",
            status_path.clone(),
            Some(sign("wrong", status_path.as_bytes())),
            401,
        ),
        (
            "another path's signature",
            status_path.clone(),
            Some(sign(secret, unknown.as_bytes())),
            401,
        ),
        ("unsigned unknown", unknown.clone(), None, 401),
        (
            "unknown deploy",
            unknown.clone(),
            Some(sign(secret, unknown.as_bytes())),
            404,
        ),
        (
            "unknown environment",
            other_env.clone(),
            Some(sign(secret, other_env.as_bytes())),
            404,
        ),
    ];
    for (what, path, sig, want) in cases {
        let (status, v) = json_answer(get(path, sig).await.unwrap()).await;
        assert_eq!(status, want, "{what}: {v}");
        assert!(v["error"].is_string(), "{what}: {v}");
    }
    let (status, v) = json_answer(
        http.post(format!("http://{}{status_path}", op.http))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 405, "{v}");

    // ---- The Secret is read at request time: rotating it takes effect without a restart. ----
    let rotated = "seed-shared-secret-rotated-777";
    let patch = serde_json::json!({"stringData": {"secret": rotated}});
    secrets
        .patch("ci-webhook", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let again = format!(
        r#"{{"event":"ghosthands.deploy_ready","image_tag":"rot1","timestamp":"{}"}}"#,
        k8s_openapi::jiff::Timestamp::now()
    );
    let (status, v) = json_answer(
        post(again.as_bytes(), secret, &[("x-gh-event", "deploy_ready")])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401, "the old secret still works: {v}");
    let (status, v) = json_answer(
        post(again.as_bytes(), rotated, &[("x-gh-event", "deploy_ready")])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["name"], "staging-rot1");
    let logs = op.logs();
    assert!(
        !logs.contains(secret) && !logs.contains(rotated),
        "the webhook secret reached the log"
    );
}

/// The CI step of examples/ci/ (bash, openssl, curl, jq), run as it is against the real operator
/// and real agents: it succeeds for a rollout that succeeds and fails for one that fails.
#[tokio::test]
async fn webhook_ci_script_waits_for_the_rollout_and_fails_with_it() {
    let mut f = fleet("webhook-ci", &[("ok", &["ok1"]), ("bad", &["bad1"])], &[]).await;
    f.agents["bad1"].fail_health_for("v2");
    let dir = tempfile::tempdir().unwrap();
    let secret = "ci-script-secret-1234567890";
    std::fs::write(dir.path().join("secret"), format!("{secret}\n")).unwrap();
    let config = format!(
        "webhook:\n  secretFile: {}\n  environments:\n    ok:\n      namespace: {ns}\n      selector: {{matchLabels: {{group: ok}}}}\n      strategy: {{maxUnavailable: 1, autoRollback: false}}\n      autoDeploy: true\n    bad:\n      namespace: {ns}\n      selector: {{matchLabels: {{group: bad}}}}\n      strategy: {{maxUnavailable: 1, autoRollback: false}}\n      autoDeploy: true\n",
        dir.path().join("secret").display(),
        ns = f.ns
    );
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, config).unwrap();
    let ec2_url = f._ec2.url();
    f.op = f.op.restart(
        &f.ns,
        &ec2_url,
        &["--config", config_path.to_str().unwrap()],
    );
    http_up(&f.op).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/ci/deploy.sh");
    let run = |environment: &str| {
        let out = tokio::process::Command::new("bash")
            .arg(script)
            .env(
                "DEPLOY_WEBHOOK_URL",
                format!(
                    "http://{}{}",
                    f.op.http,
                    sandbox_operator::operator::webhook::PATH
                ),
            )
            .env("DEPLOY_WEBHOOK_SECRET", secret)
            .env("DEPLOY_ENVIRONMENT", environment)
            .env("IMAGE_TAG", "v2")
            .env("COMMIT_SHA", "0123456789abcdef")
            .env("COMMIT_MESSAGE", "feat: v2")
            .env("DEPLOY_POLL_INTERVAL", "1")
            .env("DEPLOY_WAIT_TIMEOUT", "240")
            .output();
        async move {
            let out = out.await.unwrap();
            (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            )
        }
    };
    let (ok, out) = run("ok").await;
    assert!(
        ok,
        "the step failed for a rollout that succeeds:\n{out}\n{}",
        f.op.logs()
    );
    assert!(out.contains("Succeeded: 1/1 updated, 0 failed"), "{out}");
    let st = f.deploys.get("ok-v2").await.unwrap().status.unwrap();
    assert_eq!(st.phase, Some(DeployPhase::Succeeded));
    assert!(f.agents["ok1"].docker_calls().contains("up tag=v2"));

    let (ok, out) = run("bad").await;
    assert!(!ok, "the step passed for a rollout that fails:\n{out}");
    assert!(out.contains("rollout bad-v2 ended Failed"), "{out}");
    let st = f.deploys.get("bad-v2").await.unwrap().status.unwrap();
    assert_eq!(st.phase, Some(DeployPhase::Failed));
    assert_eq!((st.total, st.failed), (1, 1));

    // A refused delivery fails the step at once.
    let (ok, out) = run("qa").await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("404") && out.contains("unknown environment"),
        "{out}"
    );
    assert!(
        !out.contains(secret) && !f.op.logs().contains(secret),
        "the secret was printed"
    );
}

#[tokio::test]
async fn an_unhealthy_sandbox_is_skipped_unless_the_strategy_includes_it() {
    let f = fleet("skip-unhealthy", &[("g", &["ok", "sick"])], &[]).await;
    // The worker on "sick" fails its health URL on v1: the agent reports a failing check.
    f.agents["sick"].fail_health_for("v1");
    f.wait_sandbox("sick", 60, "Unhealthy", |s| {
        s.status
            .as_ref()
            .is_some_and(|st| st.phase == Some(sandbox_operator::api::SandboxPhase::Unhealthy))
    })
    .await;

    // By default: only the healthy one is deployed; the other is skipped and counted, and the
    // deploy does not count it as updated.
    f.create(
        "d-default",
        "v2",
        "g",
        serde_json::json!({"strategy": {"maxUnavailable": 2}}),
    )
    .await;
    let st = f
        .wait("d-default", 120, "finished", |st| {
            st.phase
                .is_some_and(|p| p != DeployPhase::Progressing && p != DeployPhase::Pending)
        })
        .await;
    assert_eq!(st.phase, Some(DeployPhase::Succeeded), "{st:?}");
    assert_eq!((st.total, st.updated, st.skipped, st.failed), (2, 1, 1, 0));
    assert_eq!(phase(&st, "ok"), Some(TargetPhase::Succeeded));
    assert_eq!(phase(&st, "sick"), Some(TargetPhase::Skipped));
    let skipped = st.targets.iter().find(|t| t.name == "sick").unwrap();
    assert!(
        skipped
            .message
            .as_deref()
            .unwrap()
            .contains("includeUnhealthy"),
        "{skipped:?}"
    );
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.reason, "SucceededWithSkipped");
    assert!(
        st.message.as_deref().unwrap().contains("1 skipped"),
        "{:?}",
        st.message
    );
    assert_eq!(
        f.spec_tag("sick").await,
        None,
        "the skipped one was not given the tag"
    );
    assert!(!f.agents["sick"].docker_calls().contains("tag=v2"));
    assert!(
        f.events("d-default")
            .await
            .iter()
            .any(|r| r == "TargetSkipped")
    );

    // With strategy.includeUnhealthy it is deployed too (and v3 is healthy there).
    f.create(
        "d-all",
        "v3",
        "g",
        serde_json::json!({"strategy": {"maxUnavailable": 2, "includeUnhealthy": true}}),
    )
    .await;
    let st = f
        .wait("d-all", 180, "finished", |st| {
            st.phase
                .is_some_and(|p| p != DeployPhase::Progressing && p != DeployPhase::Pending)
        })
        .await;
    assert_eq!(st.phase, Some(DeployPhase::Succeeded), "{st:?}");
    assert_eq!((st.total, st.updated, st.skipped), (2, 2, 0));
    assert_eq!(phase(&st, "sick"), Some(TargetPhase::Succeeded));
    assert_eq!(f.spec_tag("sick").await.as_deref(), Some("v3"));
    assert!(f.agents["sick"].docker_calls().contains("up tag=v3"));
}

/// A deploy sees a target's progress when the target Sandbox's status changes, not at its next
/// poll: with the deploy poll at ten minutes, a rollout in two waves still ends within a couple
/// of minutes, because each change of a target Sandbox (its deploy state, its agent's report)
/// wakes the deploys that target it. Were the deploy woken only by its own changes and the
/// poll, the second wave would wait ten minutes for it and this test would time out.
#[tokio::test]
async fn a_target_sandbox_change_wakes_the_deploy_at_once_not_at_the_next_poll() {
    let f = fleet(
        "wake",
        &[("wake", &["k1", "k2"])],
        &["--deploy-poll", "10m"],
    )
    .await;
    f.create(
        "wake-v2",
        "v2",
        "wake",
        serde_json::json!({"strategy": {"maxUnavailable": 1}}),
    )
    .await;
    let st = f
        .wait("wake-v2", 150, "Succeeded well before the 10m poll", |s| {
            s.phase == Some(DeployPhase::Succeeded)
        })
        .await;
    assert_eq!((st.updated, st.total), (2, 2));
    assert_eq!(
        st.targets.iter().filter_map(|t| t.wave).max(),
        Some(2),
        "two waves: the second started only once the first was seen done"
    );
    for name in ["k1", "k2"] {
        assert_eq!(f.spec_tag(name).await.as_deref(), Some("v2"));
    }
}
