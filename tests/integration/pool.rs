//! SandboxPool end to end: the real operator binary, the shared control plane, a wrapped moto
//! endpoint per test, and a real `sandbox-agent` per member instance.
//!
//! Members share one template, so their agent URL is a template over the instance id:
//! `http://127.0.0.1:PORT/i/{instanceId}`. [`Farm`] serves that address from the test process
//! and forwards each request to the real agent of that instance, started the first time the
//! operator asks for it (as an instance's agent comes up with the instance).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use sandbox_operator::api::{
    DEPLOY_FIELD_MANAGER, POOL_LABEL, RETIRING_ANNOTATION, Sandbox, SandboxDeploy, SandboxPool,
    SandboxPoolStatus,
};
use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions};

use crate::fleet::Agent;
use crate::support::{self, Operator, kubectl, text};

/// Real agents, one per instance id, behind one address.
struct Farm {
    agents: tokio::sync::Mutex<HashMap<String, Arc<Agent>>>,
    /// Active workers a new agent starts with.
    active: std::sync::atomic::AtomicU32,
    http: reqwest::Client,
}

impl Farm {
    async fn start() -> (Arc<Farm>, String) {
        let farm = Arc::new(Farm {
            agents: Default::default(),
            active: Default::default(),
            http: reqwest::Client::new(),
        });
        let router = axum::Router::new()
            .route("/i/{id}/{*rest}", axum::routing::any(forward))
            .with_state(farm.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        (farm, format!("http://{addr}/i/{{instanceId}}"))
    }

    async fn agent(&self, id: &str) -> Arc<Agent> {
        let mut agents = self.agents.lock().await;
        if let Some(a) = agents.get(id) {
            return a.clone();
        }
        let a = Arc::new(
            Agent::start("v1", self.active.load(std::sync::atomic::Ordering::SeqCst)).await,
        );
        agents.insert(id.to_owned(), a.clone());
        a
    }

    /// The agent of an instance, if the operator has spoken to it.
    async fn get(&self, id: &str) -> Option<Arc<Agent>> {
        self.agents.lock().await.get(id).cloned()
    }
}

async fn forward(
    State(farm): State<Arc<Farm>>,
    Path((id, rest)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let agent = farm.agent(&id).await;
    let mut req = farm
        .http
        .request(method, format!("{}/{rest}", agent.url))
        .body(body);
    for name in ["authorization", "content-type", "accept"] {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v.as_bytes());
        }
    }
    match req.send().await {
        Ok(r) => {
            let status = StatusCode::from_u16(r.status().as_u16()).unwrap();
            let ct = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap_or("").to_owned());
            let body = r.bytes().await.unwrap_or_default();
            let mut resp = (status, body).into_response();
            if let Some(ct) = ct {
                resp.headers_mut()
                    .insert("content-type", ct.parse().unwrap());
            }
            resp
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

struct Env {
    client: kube::Client,
    ns: String,
    ec2: Ec2Endpoint,
    ami: String,
    op: Operator,
    farm: Arc<Farm>,
    url: String,
    pools: Api<SandboxPool>,
    sbx: Api<Sandbox>,
}

async fn env(test: &str) -> Env {
    let client = support::client().await;
    let ns = support::namespace(&client, test).await;
    let ec2 = Ec2Endpoint::start(Ec2EndpointOptions::default())
        .await
        .expect("EC2 endpoint");
    let ami = ec2.defaults().await.unwrap().ami;
    let op = Operator::start(&ns, &ec2.url(), &[]);
    let (farm, url) = Farm::start().await;
    // Every agent of this process has the same token (crate::fleet::Agent).
    let token = format!("agent-token-{:010}", std::process::id());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "agent-token"}, "stringData": {"token": token},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    Env {
        pools: Api::namespaced(client.clone(), &ns),
        sbx: Api::namespaced(client.clone(), &ns),
        client,
        ns,
        ec2,
        ami,
        op,
        farm,
        url,
    }
}

impl Env {
    /// Applies a pool named `name` with `spec` merged over a template launching from the
    /// endpoint's AMI with the farm's agents.
    async fn pool(&self, name: &str, spec: serde_json::Value) {
        let mut full = serde_json::json!({
            "replicas": 0,
            "template": {
                "metadata": {"labels": {"group": "web"}},
                "spec": {
                    "environment": "staging", "instanceType": "t3.large",
                    "launch": {"imageId": self.ami},
                    "image": {"tag": "v1"},
                    "agent": {"urlTemplate": self.url, "tokenSecretRef": {"name": "agent-token", "key": "token"}, "probeInterval": "1s", "timeout": "1s"},
                },
            },
            "scaleDown": {"idleWindow": "0s", "drainTimeout": "1m"},
        });
        merge(&mut full, spec);
        let manifest = serde_json::json!({
            "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "SandboxPool",
            "metadata": {"name": name}, "spec": full,
        });
        self.pools
            .patch(
                name,
                &PatchParams::apply("gitops").force(),
                &Patch::Apply(&manifest),
            )
            .await
            .unwrap_or_else(|e| panic!("applying pool {name}: {e}"));
    }

    fn scale(&self, name: &str, n: i32) {
        let out = kubectl(
            &[
                "scale",
                "-n",
                &self.ns,
                "sandboxpool",
                name,
                &format!("--replicas={n}"),
            ],
            None,
        );
        assert!(out.status.success(), "kubectl scale: {}", text(&out));
    }

    /// The members not being deleted.
    async fn members(&self, pool: &str) -> Vec<Sandbox> {
        self.sbx
            .list(&ListParams::default().labels(&format!("{POOL_LABEL}={pool}")))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .collect()
    }

    async fn status(&self, pool: &str) -> SandboxPoolStatus {
        self.pools
            .get(pool)
            .await
            .unwrap()
            .status
            .unwrap_or_default()
    }

    /// Waits until the pool's status and members satisfy `f`.
    async fn wait(
        &self,
        pool: &str,
        secs: u64,
        what: &str,
        f: impl Fn(&SandboxPoolStatus, &[Sandbox]) -> bool,
    ) -> (SandboxPoolStatus, Vec<Sandbox>) {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let st = self.status(pool).await;
            let members = self.members(pool).await;
            if f(&st, &members) {
                return (st, members);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{pool}: timed out waiting for {what}: {}\nmembers: {:?}\n{}",
                serde_json::to_string_pretty(&st).unwrap(),
                members
                    .iter()
                    .map(|m| (
                        m.metadata.name.clone(),
                        m.status.as_ref().and_then(|s| s.phase),
                        m.spec.power_state
                    ))
                    .collect::<Vec<_>>(),
                tail(&self.op.logs())
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn events(&self, involved: &str) -> Vec<String> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(involved))
            .map(|e| e.reason.unwrap_or_default())
            .collect()
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (a, b) => *a = b,
    }
}

fn ready(s: &Sandbox) -> bool {
    s.status.as_ref().is_some_and(|st| {
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

fn running(s: &Sandbox) -> bool {
    s.spec.power_state == sandbox_operator::api::PowerState::Running
}

fn instance_id(s: &Sandbox) -> Option<String> {
    s.status
        .as_ref()
        .and_then(|st| st.instance.as_ref())
        .map(|i| i.id.clone())
}

fn names(members: &[Sandbox]) -> BTreeSet<String> {
    members
        .iter()
        .filter_map(|m| m.metadata.name.clone())
        .collect()
}

fn cond<'a>(st: &'a SandboxPoolStatus, type_: &str) -> Option<&'a str> {
    st.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.as_str())
}

#[tokio::test]
async fn scale_zero_to_five_to_two_and_back_with_kubectl_scale() {
    let e = env("pool-scale").await;
    e.pool("web", serde_json::json!({})).await;
    let (st, members) = e
        .wait("web", 30, "an empty, ready pool", |st, m| {
            st.observed_generation.is_some() && m.is_empty()
        })
        .await;
    assert_eq!(cond(&st, "Ready"), Some("MembersReady"));
    assert_eq!(st.selector.as_deref(), Some("fleet.valet.dev/pool=web"));
    assert!(members.is_empty());

    e.scale("web", 5);
    let (st, members) = e
        .wait("web", 180, "5 ready members", |st, m| {
            st.ready == 5 && m.len() == 5 && m.iter().all(ready)
        })
        .await;
    assert_eq!(st.replicas, 5);
    assert_eq!(cond(&st, "Ready"), Some("MembersReady"));
    let pool = e.pools.get("web").await.unwrap();
    for m in &members {
        let name = m.metadata.name.as_deref().unwrap();
        assert!(name.starts_with("web-"), "{name}");
        let owner = &m.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "SandboxPool");
        assert_eq!(owner.uid, pool.metadata.uid.clone().unwrap());
        assert_eq!(owner.controller, Some(true));
        let labels = m.metadata.labels.as_ref().unwrap();
        assert_eq!(labels.get("group").map(String::as_str), Some("web"));
        assert_eq!(labels.get(POOL_LABEL).map(String::as_str), Some("web"));
        assert_eq!(m.spec.image.as_ref().unwrap().tag, "v1");
    }
    // The scale subresource reads what the pool reports.
    let out = kubectl(
        &[
            "get",
            "--raw",
            &format!(
                "/apis/fleet.valet.dev/v1alpha1/namespaces/{}/sandboxpools/web/scale",
                e.ns
            ),
        ],
        None,
    );
    let scale: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(scale["spec"]["replicas"], 5, "{scale}");
    assert_eq!(scale["status"]["replicas"], 5, "{scale}");
    assert_eq!(scale["status"]["selector"], "fleet.valet.dev/pool=web");
    let out = kubectl(&["get", "sbxpool", "-n", &e.ns], None);
    let printed = text(&out);
    for col in [
        "DESIRED", "CURRENT", "READY", "BUSY", "STANDBY", "IMAGE", "SCALER",
    ] {
        assert!(printed.contains(col), "{printed}");
    }

    // 5 -> 2: three go (their instances with them), two stay untouched.
    let before = names(&members);
    let ids: BTreeMap<String, String> = members
        .iter()
        .map(|m| (m.metadata.name.clone().unwrap(), instance_id(m).unwrap()))
        .collect();
    e.scale("web", 2);
    let (st, members) = e
        .wait("web", 120, "2 members", |st, m| {
            st.replicas == 2 && st.ready == 2 && m.len() == 2 && st.retiring == 0
        })
        .await;
    assert!(names(&members).is_subset(&before));
    let ec2 = e.ec2.client().await;
    let gone: Vec<String> = ids
        .iter()
        .filter(|(n, _)| !names(&members).contains(*n))
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(gone.len(), 3);
    support::eventually(60, "the removed members' instances terminated", || {
        let ec2 = ec2.clone();
        let gone = gone.clone();
        async move {
            let out = ec2
                .describe_instances()
                .set_instance_ids(Some(gone))
                .send()
                .await
                .ok()?;
            out.reservations()
                .iter()
                .flat_map(|r| r.instances())
                .all(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) == Some("terminated"))
                .then_some(())
        }
    })
    .await;
    assert_eq!(cond(&st, "Ready"), Some("MembersReady"));

    // And back to 5.
    e.scale("web", 5);
    e.wait("web", 180, "5 ready members again", |st, m| {
        st.ready == 5 && m.len() == 5 && m.iter().all(ready)
    })
    .await;
    // A member deleted by hand is replaced.
    let victim = e.members("web").await[0].metadata.name.clone().unwrap();
    e.sbx.delete(&victim, &Default::default()).await.unwrap();
    let (_, members) = e
        .wait("web", 180, "the deleted member replaced", |st, m| {
            st.ready == 5 && m.len() == 5 && !names(m).contains(&victim)
        })
        .await;
    assert_eq!(members.len(), 5);
    let events = e.events("web").await;
    assert!(events.iter().any(|r| r == "MemberCreated"), "{events:?}");
    assert!(events.iter().any(|r| r == "MemberDraining"), "{events:?}");
}

#[tokio::test]
async fn a_busy_member_survives_scale_in_while_idle_ones_go() {
    let e = env("pool-busy").await;
    e.pool(
        "web",
        serde_json::json!({"replicas": 3, "scaleDown": {"idleWindow": "0s", "drainTimeout": "2s", "afterDrainTimeout": "Wait"}}),
    )
    .await;
    let (_, members) = e
        .wait("web", 180, "3 ready members", |st, m| {
            st.ready == 3 && m.len() == 3
        })
        .await;
    // The oldest-created is busy; newest-first order alone would keep it anyway, so make the
    // newest busy.
    let mut by_age = members.clone();
    by_age.sort_by_key(|m| m.metadata.creation_timestamp.clone().map(|t| t.0));
    let busy = by_age.last().unwrap().clone();
    let busy_name = busy.metadata.name.clone().unwrap();
    let agent = e.farm.get(&instance_id(&busy).unwrap()).await.unwrap();
    agent.set_active(2);
    e.wait("web", 60, "one busy member", |st, _| st.busy == 1)
        .await;

    e.scale("web", 1);
    let (st, members) = e
        .wait("web", 120, "the idle ones gone", |st, m| {
            m.len() == 1 && st.replicas == 1
        })
        .await;
    assert_eq!(names(&members), BTreeSet::from([busy_name.clone()]));
    assert!(
        !members[0]
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(RETIRING_ANNOTATION)),
        "the busy member was never drained"
    );
    assert_eq!(st.busy, 1);

    // To zero: the busy one is drained and, past its drain timeout, kept (Wait) while busy.
    e.scale("web", 0);
    e.wait("web", 60, "waiting for the drain", |st, _| {
        cond(st, "Progressing") == Some("WaitingForDrain")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let members = e.members("web").await;
    assert_eq!(names(&members), BTreeSet::from([busy_name.clone()]));
    let drained = members[0]
        .status
        .as_ref()
        .and_then(|s| s.last_action.as_ref())
        .map(|a| a.name.clone());
    assert_eq!(drained.as_deref(), Some("drain"));
    // Its jobs done, it goes.
    agent.set_active(0);
    e.wait("web", 60, "the drained member gone", |st, m| {
        m.is_empty() && st.retiring == 0
    })
    .await;
}

#[tokio::test]
async fn standby_members_are_started_not_launched() {
    let e = env("pool-standby").await;
    e.pool("web", serde_json::json!({"replicas": 1, "standby": 2}))
        .await;
    let (_, members) = e
        .wait("web", 180, "1 ready and 2 stopped standby", |st, m| {
            st.ready == 1 && st.standby == 2 && m.len() == 3
        })
        .await;
    let standby: BTreeMap<String, String> = members
        .iter()
        .filter(|m| !running(m))
        .map(|m| (m.metadata.name.clone().unwrap(), instance_id(m).unwrap()))
        .collect();
    assert_eq!(standby.len(), 2);
    e.ec2.reset_calls().await.unwrap();

    e.scale("web", 3);
    let (_, members) = e
        .wait("web", 180, "3 ready and the standby refilled", |st, m| {
            st.ready == 3 && st.standby == 2 && m.len() == 5
        })
        .await;
    // The two standby members serve now, on the same instances: started, not launched.
    for (name, id) in &standby {
        let m = members
            .iter()
            .find(|m| m.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("standby member {name} is gone"));
        assert!(running(m) && ready(m), "{name} is not serving");
        assert_eq!(instance_id(m).as_deref(), Some(id.as_str()));
    }
    let log = e.ec2.call_log(0.0).await.unwrap();
    let started: BTreeSet<String> = log
        .iter()
        .filter(|c| c.action == "StartInstances" && c.outcome == "accepted")
        .flat_map(|c| c.ids.clone())
        .collect();
    for id in standby.values() {
        assert!(started.contains(id), "{id} was not started: {started:?}");
    }
    // Launches since: only the two new standby members, none for the scale-out itself.
    let calls = e.ec2.calls().await.unwrap();
    assert_eq!(calls.accepted("RunInstances"), 2, "{calls:?}");
    let events = e.events("web").await;
    assert!(events.iter().any(|r| r == "StandbyStarted"), "{events:?}");
}

#[tokio::test]
async fn a_member_created_after_a_deploy_gets_the_new_tag() {
    let e = env("pool-tag").await;
    e.pool("web", serde_json::json!({"replicas": 2})).await;
    e.wait("web", 180, "2 ready members", |st, m| {
        st.ready == 2 && m.len() == 2
    })
    .await;
    let deploys: Api<SandboxDeploy> = Api::namespaced(e.client.clone(), &e.ns);
    let d: SandboxDeploy = serde_json::from_value(serde_json::json!({
        "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "SandboxDeploy",
        "metadata": {"name": "web-v2"},
        "spec": {"image": {"tag": "v2"}, "selector": {"matchLabels": {"group": "web"}}, "strategy": {"maxUnavailable": 2}},
    }))
    .unwrap();
    deploys.create(&PostParams::default(), &d).await.unwrap();
    support::eventually(180, "the deploy to succeed", || async {
        let d = deploys.get("web-v2").await.ok()?;
        (d.status?.phase? == sandbox_operator::api::DeployPhase::Succeeded).then_some(())
    })
    .await;
    let (st, _) = e
        .wait("web", 60, "the template tag v2", |st, _| {
            st.image_tag.as_deref() == Some("v2")
        })
        .await;
    assert_eq!(st.image_deploy.as_deref(), Some("web-v2"));
    let pool = e.pools.get("web").await.unwrap();
    assert_eq!(pool.spec.template.spec.image.as_ref().unwrap().tag, "v2");
    // Under the deploy's field manager, as on Sandboxes.
    let managers: Vec<String> = pool
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|f| {
            f.fields_v1
                .as_ref()
                .is_some_and(|v| v.0.to_string().contains("f:tag"))
        })
        .filter_map(|f| f.manager)
        .collect();
    assert_eq!(managers, vec![DEPLOY_FIELD_MANAGER.to_string()]);

    e.scale("web", 3);
    let (_, members) = e
        .wait("web", 180, "3 ready members", |st, m| {
            st.ready == 3 && m.len() == 3
        })
        .await;
    for m in &members {
        assert_eq!(m.spec.image.as_ref().unwrap().tag, "v2");
    }
    // The new member's agent runs it (the Sandbox controller deployed it).
    e.wait("web", 120, "every agent on v2", |_, m| {
        m.len() == 3
            && m.iter().all(|s| {
                s.status
                    .as_ref()
                    .and_then(|st| st.agent.as_ref())
                    .and_then(|a| a.image_tag.as_deref())
                    == Some("v2")
            })
    })
    .await;
    let events = e.events("web").await;
    assert!(events.iter().any(|r| r == "TemplateTagSet"), "{events:?}");

    // A deploy that fails (its tag never turns healthy, the targets roll back) leaves the
    // template as it was.
    for m in &members {
        let agent = e.farm.get(&instance_id(m).unwrap()).await.unwrap();
        agent.fail_health_for("v3");
    }
    let d: SandboxDeploy = serde_json::from_value(serde_json::json!({
        "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "SandboxDeploy",
        "metadata": {"name": "web-v3"},
        "spec": {"image": {"tag": "v3"}, "selector": {"matchLabels": {"group": "web"}}},
    }))
    .unwrap();
    deploys.create(&PostParams::default(), &d).await.unwrap();
    support::eventually(180, "the v3 deploy to fail", || async {
        let d = deploys.get("web-v3").await.ok()?;
        (d.status?.phase? == sandbox_operator::api::DeployPhase::Failed).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pool = e.pools.get("web").await.unwrap();
    assert_eq!(pool.spec.template.spec.image.as_ref().unwrap().tag, "v2");
    let st = pool.status.unwrap_or_default();
    assert_eq!(st.image_deploy.as_deref(), Some("web-v2"));
    assert_eq!(st.image_tag.as_deref(), Some("v2"));
}

#[tokio::test]
async fn a_template_ami_change_replaces_members_within_max_unavailable() {
    let e = env("pool-ami").await;
    e.pool(
        "web",
        serde_json::json!({"replicas": 2, "maxSurge": 1, "maxUnavailable": 0}),
    )
    .await;
    let (_, old) = e
        .wait("web", 180, "2 ready members", |st, m| {
            st.ready == 2 && m.len() == 2
        })
        .await;
    let old = names(&old);
    let new_ami = "ami-0abcdef1234567890";
    assert_ne!(new_ami, e.ami);
    e.pool(
        "web",
        serde_json::json!({"replicas": 2, "maxSurge": 1, "maxUnavailable": 0, "template": {"spec": {"launch": {"imageId": new_ami}}}}),
    )
    .await;
    // Throughout, at least replicas - maxUnavailable = 2 members serve (ready, not drained),
    // and never more than replicas + maxSurge = 3 exist outside deletion.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let mut most = 0;
    loop {
        let members = e.members("web").await;
        let serving = members
            .iter()
            .filter(|m| {
                ready(m)
                    && !m
                        .metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.contains_key(RETIRING_ANNOTATION))
            })
            .count();
        assert!(
            serving >= 2,
            "only {serving} members serving during the replacement: {:?}",
            names(&members)
        );
        let not_retiring = members
            .iter()
            .filter(|m| {
                !m.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(RETIRING_ANNOTATION))
            })
            .count();
        most = most.max(not_retiring);
        assert!(not_retiring <= 3, "{not_retiring} members at once");
        let done = members.len() == 2
            && members.iter().all(|m| {
                ready(m)
                    && !old.contains(m.metadata.name.as_deref().unwrap())
                    && m.spec.launch.as_ref().unwrap().image_id == new_ami
            });
        if done {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replacement not done: {:?}\n{}",
            names(&members),
            tail(&e.op.logs())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(most, 3, "the surge member was never there");
    let st = e.status("web").await;
    assert_eq!(st.updated, 2);
    // The instances run the new AMI.
    let ec2 = e.ec2.client().await;
    for m in e.members("web").await {
        let out = ec2
            .describe_instances()
            .instance_ids(instance_id(&m).unwrap())
            .send()
            .await
            .unwrap();
        let image = out.reservations()[0].instances()[0]
            .image_id()
            .map(str::to_owned);
        assert_eq!(image.as_deref(), Some(new_ami));
    }
}

#[tokio::test]
async fn an_unregistered_member_is_replaced() {
    let e = env("pool-unregistered").await;
    e.pool("web", serde_json::json!({"replicas": 2})).await;
    let (_, members) = e
        .wait("web", 180, "2 ready members", |st, m| {
            st.ready == 2 && m.len() == 2
        })
        .await;
    let victim = members[0].metadata.name.clone().unwrap();
    // What the bootstrap reports of a member whose agent never registered.
    let patch = serde_json::json!({
        "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "Sandbox",
        "status": {"conditions": [{
            "type": "AgentRegistered", "status": "False", "reason": "RegistrationTimedOut",
            "message": "no healthy report within registrationTimeout",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]},
    });
    e.sbx
        .patch_status(
            &victim,
            &PatchParams::apply("test-bootstrap").force(),
            &Patch::Apply(&patch),
        )
        .await
        .unwrap();
    let (_, members) = e
        .wait("web", 180, "the unregistered member replaced", |st, m| {
            st.ready == 2 && m.len() == 2 && !names(m).contains(&victim)
        })
        .await;
    assert_eq!(members.len(), 2);
    let events = e.events("web").await;
    assert!(
        events.iter().any(|r| r == "MemberUnregistered"),
        "{events:?}"
    );
}

#[tokio::test]
async fn autoscale_up_on_busy_agents_and_down_after_the_window() {
    let e = env("pool-autoscale").await;
    // Capacity 2 at target 0.5: one busy session per member.
    e.pool(
        "web",
        serde_json::json!({
            "replicas": 1,
            "template": {"spec": {"capacity": 2}},
            "autoscale": {"minReplicas": 1, "maxReplicas": 3, "targetBusyFraction": 0.5, "stabilizationWindow": "5s"},
        }),
    )
    .await;
    let (st, members) = e
        .wait("web", 180, "1 ready member", |st, m| {
            st.ready == 1 && m.len() == 1
        })
        .await;
    assert_eq!(st.scaler, Some(sandbox_operator::api::Scaler::Autoscale));
    let agent = e
        .farm
        .get(&instance_id(&members[0]).unwrap())
        .await
        .unwrap();
    agent.set_active(3);
    let (st, _) = e
        .wait("web", 180, "3 ready members", |st, m| {
            st.ready == 3 && m.len() == 3
        })
        .await;
    assert_eq!(st.recommended_replicas, Some(3));
    let pool = e.pools.get("web").await.unwrap();
    assert_eq!(pool.spec.replicas, 3);
    assert!(
        pool.metadata
            .managed_fields
            .unwrap_or_default()
            .iter()
            .any(|f| f.manager.as_deref() == Some("sandbox-operator-autoscale")),
        "replicas not set by the autoscaler"
    );
    // The load goes: after the 5s window (not before), back to 1.
    agent.set_active(0);
    let quiet = std::time::Instant::now();
    e.wait("web", 120, "back to 1 member", |st, m| {
        st.replicas == 1 && m.len() == 1
    })
    .await;
    assert!(quiet.elapsed() >= Duration::from_secs(5));
    let events = e.events("web").await;
    assert!(events.iter().any(|r| r == "Autoscaled"), "{events:?}");
}

#[tokio::test]
async fn the_api_server_refuses_a_pool_it_cannot_run() {
    let e = env("pool-cel").await;
    let apply = |spec: serde_json::Value| {
        let e = &e;
        async move {
            let manifest = serde_json::json!({
                "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "SandboxPool",
                "metadata": {"name": "bad"}, "spec": spec,
            });
            e.pools
                .patch(
                    "bad",
                    &PatchParams::apply("gitops").force(),
                    &Patch::Apply(&manifest),
                )
                .await
                .map(|_| ())
                .map_err(|err| err.to_string())
        }
    };
    let template = serde_json::json!({"spec": {"environment": "staging", "instanceType": "t3.large", "launch": {"imageId": e.ami}}});
    let err = apply(serde_json::json!({"replicas": 5, "template": template, "autoscale": {"minReplicas": 3, "maxReplicas": 2}}))
        .await
        .unwrap_err();
    assert!(
        err.contains("autoscale.minReplicas must not be greater than autoscale.maxReplicas"),
        "{err}"
    );
    let err = apply(serde_json::json!({"replicas": 5, "template": template, "autoscale": {"minReplicas": 1, "maxReplicas": 3}}))
        .await
        .unwrap_err();
    assert!(
        err.contains("replicas must lie within autoscale.minReplicas"),
        "{err}"
    );
    let err = apply(serde_json::json!({"template": {"spec": {"environment": "staging", "instanceId": "i-0123456789abcdef0"}}}))
        .await
        .unwrap_err();
    assert!(err.contains("a pool launches its members"), "{err}");
    let err = apply(serde_json::json!({"template": template, "maxSurge": 0, "maxUnavailable": 0}))
        .await
        .unwrap_err();
    assert!(
        err.contains("maxSurge and maxUnavailable cannot both be 0"),
        "{err}"
    );
    // A valid one, then its launch settings change: allowed (members are replaced).
    apply(serde_json::json!({"replicas": 0, "template": template}))
        .await
        .unwrap();
    apply(serde_json::json!({"replicas": 0, "template": {"spec": {"environment": "staging", "instanceType": "t3.xlarge", "launch": {"imageId": "ami-0abcdef1234567890"}}}}))
        .await
        .unwrap();
}
