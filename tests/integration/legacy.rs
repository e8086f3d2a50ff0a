//! Sandboxes whose agent is still the seeds' old `health-server.js`: the real operator binary,
//! the shared control plane, a wrapped moto EC2 endpoint, and the old server's protocol served
//! by `tests/tools/legacy-health-server/health-server.js` under `node`, with a stand-in worker
//! status endpoint (for `activeWorkers`) and a stand-in deploy script that records what it was
//! asked to deploy.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use sandbox_operator::api::{
    DeployPhase, Sandbox, SandboxDeploy, SandboxDeployStatus, SandboxStatus, TargetPhase,
};
use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions};

use crate::support::{self, Operator};

const HEALTH_SERVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/tools/legacy-health-server/health-server.js"
);

/// Records each deploy it is asked for, as the seeds' `deploy.sh deploy <tag>` would run.
const DEPLOY_OK: &str = "#!/bin/sh\necho \"$1 $2\" >> \"$(dirname \"$0\")/deployed\"\n";
/// Records the deploy, then takes the box's health server down with it: it never answers again.
const DEPLOY_DIES: &str =
    "#!/bin/sh\necho \"$1 $2\" >> \"$(dirname \"$0\")/deployed\"\nkill \"$PPID\"\n";

/// One old health server under `node`, and the worker whose `activeWorkers` it reports.
struct LegacyServer {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    url: String,
    active: Arc<AtomicU32>,
    child: std::process::Child,
}

impl LegacyServer {
    async fn start(script: &str, active: u32) -> LegacyServer {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let active = Arc::new(AtomicU32::new(active));
        let router = axum::Router::new()
            .route(
                "/worker/status",
                get(|State(n): State<Arc<AtomicU32>>| async move {
                    let n = n.load(Ordering::SeqCst);
                    Json(serde_json::json!({"activeWorkers": n, "deploy_safe": n == 0}))
                }),
            )
            .with_state(active.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let worker = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let deploy = dir.join("deploy.sh");
        std::fs::write(&deploy, script).unwrap();
        std::fs::set_permissions(&deploy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let port = sandbox_operator::testenv::free_port();
        let mut cmd = std::process::Command::new("node");
        cmd.arg(HEALTH_SERVER)
            .env("PORT", port.to_string())
            .env("HOST", "127.0.0.1")
            .env("DEPLOY_SCRIPT", &deploy)
            .env(
                "WORKER_STATUS_URL",
                format!("http://{worker}/worker/status"),
            )
            // Nothing listens there: AdsPower reads "stopped", as on a box without it.
            .env("ADSPOWER_URL", "http://127.0.0.1:9/status");
        let child = sandbox_operator::testenv::process::spawn_tied(cmd, &dir.join("server.log"))
            .expect("starting node (is Node.js installed?)");
        let url = format!("http://127.0.0.1:{port}");
        let server = LegacyServer {
            _tmp: tmp,
            dir,
            url,
            active,
            child,
        };
        for _ in 0..100 {
            if let Ok(r) = reqwest::get(format!("{}/health", server.url)).await
                && r.status().is_success()
            {
                let body: serde_json::Value = r.json().await.unwrap();
                // The old protocol exactly: none of the new agent's fields.
                for field in ["agentVersion", "imageTag", "deploy", "checks"] {
                    assert!(body.get(field).is_none(), "{field} in {body}");
                }
                assert_eq!(body["status"], "ok");
                return server;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the legacy health server did not start: {}", server.logs());
    }

    /// What the deploy script was asked for, one `deploy <tag>` a line.
    fn deployed(&self) -> String {
        std::fs::read_to_string(self.dir.join("deployed")).unwrap_or_default()
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for LegacyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Env {
    client: kube::Client,
    ns: String,
    _ec2: Ec2Endpoint,
    op: Operator,
    sbx: Api<Sandbox>,
}

async fn env(test: &str, server: &LegacyServer, args: &[&str]) -> Env {
    let client = support::client().await;
    let ns = support::namespace(&client, test).await;
    let ec2 = Ec2Endpoint::start(Ec2EndpointOptions::default())
        .await
        .unwrap();
    let ami = ec2.defaults().await.unwrap().ami;
    let op = Operator::start(&ns, &ec2.url(), args);
    let sbx: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    // As users would write it for a box that runs the old server: its URL, no token.
    let manifest = serde_json::json!({
        "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "Sandbox",
        "metadata": {"name": "old-1", "labels": {"group": "legacy"}},
        "spec": {
            "environment": "staging", "instanceType": "t3.large", "launch": {"imageId": ami},
            "agent": {"url": server.url, "probeInterval": "1s", "timeout": "1s"},
        },
    });
    sbx.patch(
        "old-1",
        &PatchParams::apply("gitops").force(),
        &Patch::Apply(&manifest),
    )
    .await
    .unwrap();
    let e = Env {
        client,
        ns,
        _ec2: ec2,
        op,
        sbx,
    };
    e.wait(server, 90, "Ready", |st| {
        cond(st, "Ready") == Some("True".into())
    })
    .await;
    e
}

fn cond(st: &SandboxStatus, type_: &str) -> Option<String> {
    st.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

fn cond_reason(st: &SandboxStatus, type_: &str) -> (String, String) {
    st.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

impl Env {
    async fn wait(
        &self,
        server: &LegacyServer,
        secs: u64,
        what: &str,
        f: impl Fn(&SandboxStatus) -> bool,
    ) -> SandboxStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let st = self
                .sbx
                .get("old-1")
                .await
                .unwrap()
                .status
                .unwrap_or_default();
            if f(&st) {
                return st;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}: {}\n---- health server ----\n{}\n---- operator ----\n{}",
                serde_json::to_string_pretty(&st).unwrap(),
                server.logs(),
                self.op.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn set_tag(&self, tag: &str) {
        let patch = serde_json::json!({"spec": {"image": {"tag": tag}}});
        self.sbx
            .patch("old-1", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    async fn events(&self) -> Vec<(String, String)> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.involved_object.name.as_deref() == Some("old-1"))
            .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
            .collect()
    }
}

fn deploy_state(st: &SandboxStatus) -> Option<(String, String)> {
    st.deploy
        .as_ref()
        .map(|d| (d.tag.clone(), d.state.as_str().to_string()))
}

#[tokio::test]
async fn a_legacy_health_server_is_drained_deployed_and_assumed_up_to_date() {
    let server = LegacyServer::start(DEPLOY_OK, 1).await;
    let e = env("legacy-deploy", &server, &["--legacy-deploy-settle", "3s"]).await;
    let st = e.sbx.get("old-1").await.unwrap().status.unwrap();
    let agent = st.agent.unwrap();
    assert_eq!(agent.agent_version, None);
    assert_eq!(agent.active_workers, Some(1));

    // A new tag while a worker is busy: drain (on activeWorkers; the old server has no /drain).
    e.set_tag("v2").await;
    e.wait(&server, 30, "Draining", |st| {
        deploy_state(st) == Some(("v2".into(), "Draining".into()))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(server.deployed(), "", "deployed while a worker was busy");
    let st = e.sbx.get("old-1").await.unwrap().status.unwrap();
    assert_eq!(deploy_state(&st), Some(("v2".into(), "Draining".into())));

    // Idle: POST /deploy, then healthy answers after the settle time.
    server.active.store(0, Ordering::SeqCst);
    let st = e
        .wait(&server, 60, "the deploy to succeed", |st| {
            deploy_state(st) == Some(("v2".into(), "Succeeded".into()))
        })
        .await;
    assert_eq!(server.deployed(), "deploy v2\n");
    let d = st.deploy.clone().unwrap();
    assert!(d.legacy_agent);
    let requested = d.requested_at.expect("requestedAt").0.as_second();
    let finished = d.finished_at.expect("finishedAt").0.as_second();
    assert!(
        finished - requested >= 3,
        "succeeded {}s after POST /deploy, before the settle time",
        finished - requested
    );
    assert_eq!(cond(&st, "ImageUpToDate"), Some("True".into()));
    let (reason, message) = cond_reason(&st, "ImageUpToDate");
    assert_eq!(reason, "AssumedByLegacyAgent");
    assert!(message.contains("assumed to run v2"), "{message}");
    assert_eq!(
        st.agent.as_ref().unwrap().image_tag,
        None,
        "the old server reported no tag, so none is shown as reported"
    );
    // Ready follows, and stays (no 15-minute deadline failure, no second deploy).
    let st = e
        .wait(&server, 30, "Ready", |st| {
            cond(st, "Ready") == Some("True".into())
        })
        .await;
    assert_eq!(st.phase, Some(sandbox_operator::api::SandboxPhase::Active));
    let events = e.events().await;
    assert!(
        events.iter().any(|(r, _)| r == "DeploySucceeded"),
        "{events:?}"
    );

    // A SandboxDeploy over it succeeds through the same path.
    let deploys: Api<SandboxDeploy> = Api::namespaced(e.client.clone(), &e.ns);
    let sd: SandboxDeploy = serde_json::from_value(serde_json::json!({
        "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "SandboxDeploy",
        "metadata": {"name": "legacy-v3"},
        "spec": {"image": {"tag": "v3"}, "selector": {"matchLabels": {"group": "legacy"}}},
    }))
    .unwrap();
    deploys.create(&PostParams::default(), &sd).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let dst: SandboxDeployStatus = loop {
        let s = deploys
            .get("legacy-v3")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        if matches!(s.phase, Some(DeployPhase::Succeeded | DeployPhase::Failed)) {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the SandboxDeploy did not finish: {}\n{}",
            serde_json::to_string_pretty(&s).unwrap(),
            e.op.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        dst.phase,
        Some(DeployPhase::Succeeded),
        "{}",
        serde_json::to_string_pretty(&dst).unwrap()
    );
    assert_eq!(dst.targets.len(), 1);
    assert_eq!(dst.targets[0].phase, TargetPhase::Succeeded);
    assert_eq!(server.deployed(), "deploy v2\ndeploy v3\n");
    let st = e.sbx.get("old-1").await.unwrap().status.unwrap();
    let d = st.deploy.clone().unwrap();
    assert_eq!((d.tag.as_str(), d.state.as_str()), ("v3", "Succeeded"));
    assert_eq!(d.previous_tag.as_deref(), Some("v2"), "the assumed tag");
    assert_eq!(cond_reason(&st, "ImageUpToDate").0, "AssumedByLegacyAgent");
}

#[tokio::test]
async fn a_legacy_deploy_that_never_comes_back_fails_at_the_sandbox_deadline() {
    let server = LegacyServer::start(DEPLOY_DIES, 0).await;
    let e = env(
        "legacy-dies",
        &server,
        &["--legacy-deploy-settle", "2s", "--deploy-deadline", "12s"],
    )
    .await;
    e.set_tag("v2").await;
    let st = e
        .wait(&server, 90, "the deploy to fail", |st| {
            deploy_state(st).is_some_and(|(_, s)| s == "Failed")
        })
        .await;
    // The deploy reached the box (its script ran), and the box never answered again.
    assert_eq!(server.deployed(), "deploy v2\n");
    let d = st.deploy.clone().unwrap();
    let message = d.message.clone().unwrap_or_default();
    assert!(
        message.contains("did not answer healthy again within 12s"),
        "{message}"
    );
    let started = d.started_at.unwrap().0.as_second();
    let finished = d.finished_at.unwrap().0.as_second();
    assert!(
        finished - started >= 12,
        "failed {}s after it started, before the deadline",
        finished - started
    );
    // Generous: the deadline is 12s, a probe every second.
    assert!(
        finished - started <= 60,
        "failed only {}s after it started",
        finished - started
    );
    let (reason, cmsg) = cond_reason(&st, "ImageUpToDate");
    assert_eq!(reason, "DeployFailed");
    assert!(cmsg.contains("legacy health server"), "{cmsg}");
    assert_eq!(cond(&st, "Ready"), Some("False".into()));
    let events = e.events().await;
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "DeployFailed" && m.contains("did not answer healthy")),
        "{events:?}"
    );
}
