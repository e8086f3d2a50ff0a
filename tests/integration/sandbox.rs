//! The Sandbox controller end to end: the real `sandbox-operator run` binary against the shared
//! control plane, a wrapped moto EC2 endpoint of the test's own, and real agent processes.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use sandbox_operator::api::{Sandbox, SandboxPhase, SandboxStatus};
use sandbox_operator::testenv::ec2::{Delays, Ec2Endpoint, Ec2EndpointOptions, Fault};

use crate::fleet::Agent;
use crate::support::{self, Operator, eventually};

struct Env {
    client: kube::Client,
    ns: String,
    ec2: Ec2Endpoint,
    ami: String,
    sbx: Api<Sandbox>,
}

async fn env(test: &str, transitions: Duration) -> Env {
    let client = support::client().await;
    let ns = support::namespace(&client, test).await;
    let ec2 = Ec2Endpoint::start(Ec2EndpointOptions::default().with_transitions(transitions))
        .await
        .expect("EC2 endpoint");
    let ami = ec2.defaults().await.unwrap().ami;
    let sbx = Api::namespaced(client.clone(), &ns);
    Env {
        client,
        ns,
        ec2,
        ami,
        sbx,
    }
}

impl Env {
    fn operator(&self) -> Operator {
        Operator::start(&self.ns, &self.ec2.url(), &[])
    }

    async fn apply(&self, yaml: &str) {
        let value: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        let name = value["metadata"]["name"].as_str().unwrap().to_string();
        let json: serde_json::Value = serde_json::to_value(value).unwrap();
        self.sbx
            .patch(
                &name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&json),
            )
            .await
            .unwrap_or_else(|e| panic!("applying {name}: {e}"));
    }

    fn launched(&self, name: &str, extra: &str) -> String {
        format!(
            "apiVersion: fleet.valet.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: {name}}}\nspec:\n  environment: staging\n  instanceType: t3.large\n  launch: {{imageId: {ami}}}\n{extra}",
            ami = self.ami
        )
    }

    async fn status(&self, name: &str) -> SandboxStatus {
        self.sbx.get(name).await.unwrap().status.unwrap_or_default()
    }

    async fn wait(
        &self,
        name: &str,
        secs: u64,
        what: &str,
        f: impl Fn(&SandboxStatus) -> bool,
    ) -> SandboxStatus {
        let mut last = SandboxStatus::default();
        let r = tokio::time::timeout(Duration::from_secs(secs), async {
            loop {
                if let Ok(s) = self.sbx.get(name).await {
                    last = s.status.unwrap_or_default();
                    if f(&last) {
                        return last.clone();
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        r.unwrap_or_else(|_| {
            panic!(
                "{name}: timed out after {secs}s waiting for {what}; last status: {}",
                serde_json::to_string_pretty(&last).unwrap()
            )
        })
    }

    async fn instances(&self) -> Vec<aws_sdk_ec2::types::Instance> {
        let out = self
            .ec2
            .client()
            .await
            .describe_instances()
            .send()
            .await
            .unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances().to_vec())
            .collect()
    }

    async fn events(&self, name: &str) -> Vec<(String, String)> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        let list = api.list(&ListParams::default()).await.unwrap();
        list.items
            .into_iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(name))
            .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
            .collect()
    }

    async fn agent_secret(&self, agent: &Agent) {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let s: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "agent-token"},
            "stringData": {"token": agent.token},
        }))
        .unwrap();
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
}

fn cond(s: &SandboxStatus, t: &str) -> Option<(String, String, String)> {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn is(s: &SandboxStatus, t: &str, status: &str) -> bool {
    cond(s, t).is_some_and(|c| c.0 == status)
}

fn agent_spec(agent: &Agent) -> String {
    format!(
        "  agent: {{url: \"{}\", tokenSecretRef: {{name: agent-token, key: token}}, probeInterval: 1s, timeout: 1s, failureThreshold: 2}}\n",
        agent.url
    )
}

#[tokio::test]
async fn launch_gets_exactly_one_tagged_instance_and_terminates_on_delete() {
    let e = env("launch", Duration::from_secs(1)).await;
    let agent = Agent::start("v1", 0).await;
    e.agent_secret(&agent).await;
    let op = e.operator();
    e.apply(&e.launched("web-1", &agent_spec(&agent))).await;
    let st = e
        .wait("web-1", 60, "Ready", |s| is(s, "Ready", "True"))
        .await;
    assert_eq!(st.phase, Some(SandboxPhase::Active));
    let obj = e.sbx.get("web-1").await.unwrap();
    assert!(
        obj.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"fleet.valet.dev/instance".to_string())
    );
    let id = st.instance.as_ref().unwrap().id.clone();
    let instances = e.instances().await;
    assert_eq!(instances.len(), 1, "exactly one instance");
    let tags: std::collections::BTreeMap<_, _> = instances[0]
        .tags()
        .iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_string(),
                t.value().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        tags.get("fleet.valet.dev/name").map(String::as_str),
        Some("web-1")
    );
    assert_eq!(tags.get("fleet.valet.dev/namespace"), Some(&e.ns));
    assert_eq!(
        tags.get("fleet.valet.dev/sandbox-uid"),
        obj.metadata.uid.as_ref()
    );
    assert_eq!(
        tags.get("fleet.valet.dev/environment").map(String::as_str),
        Some("staging")
    );
    assert_eq!(e.ec2.calls().await.unwrap().accepted("RunInstances"), 1);
    assert_eq!(st.agent.as_ref().unwrap().image_tag.as_deref(), Some("v1"));
    assert!(
        e.events("web-1")
            .await
            .iter()
            .any(|(r, m)| r == "Launched" && m.contains(&id))
    );

    // Printer columns show the instance.
    let out = support::kubectl(&["get", "sbx", "web-1", "-n", &e.ns], None);
    let text = support::text(&out);
    assert!(
        text.contains(&id) && text.contains("Active") && text.contains("running"),
        "{text}"
    );

    // The ledger mirrors the fleet in the seeds' `sandboxes` table, read through the report.
    let report = eventually(30, "the sandbox in the ledger", || async {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox-operator"))
            .args(["report", "fleet", "--ledger", &op.ledger, "-o", "json"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (text.contains("web-1") && text.contains(&id)).then_some(text)
    })
    .await;
    assert!(report.contains("running"), "{report}");
    // ...and its power interval feeds the cost report.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox-operator"))
        .args([
            "report", "cost", "--since", "1d", "--ledger", &op.ledger, "-o", "json",
        ])
        .output()
        .unwrap();
    let cost = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && cost.contains(&id),
        "{cost}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Delete: terminated, then the finalizer goes.
    e.sbx
        .delete("web-1", &DeleteParams::default())
        .await
        .unwrap();
    eventually(60, "the Sandbox to be gone", || async {
        e.sbx
            .get_opt("web-1")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let state = e.instances().await[0]
        .state()
        .unwrap()
        .name()
        .unwrap()
        .as_str()
        .to_string();
    assert_eq!(state, "terminated");
    drop(op);
}

#[tokio::test]
async fn killed_between_run_instances_and_status_write_leaves_one_instance() {
    let e = env("crash", Duration::ZERO).await;
    // EC2 acts at once but holds its answer: the operator dies in that window.
    e.ec2
        .set_response_delay("RunInstances", Duration::from_secs(4))
        .await
        .unwrap();
    let mut op = e.operator();
    e.apply(&e.launched("crash-1", "")).await;
    eventually(60, "RunInstances to reach EC2", || async {
        (e.ec2.calls().await.unwrap().accepted("RunInstances") >= 1).then_some(())
    })
    .await;
    op.kill();
    assert!(
        e.status("crash-1").await.instance.is_none(),
        "the status must not have been written yet"
    );
    assert_eq!(e.instances().await.len(), 1);
    e.ec2.clear_faults().await.unwrap();
    let op = op.restart(&e.ns, &e.ec2.url(), &[]);
    let st = e
        .wait("crash-1", 60, "the instance recorded", |s| {
            s.instance.is_some()
        })
        .await;
    let instances = e.instances().await;
    assert_eq!(
        instances.len(),
        1,
        "a second instance was launched: {instances:?}"
    );
    assert_eq!(st.instance.unwrap().id, instances[0].instance_id().unwrap());
    // The restarted operator found it by its UID tag; it did not launch again.
    assert_eq!(
        e.ec2.calls().await.unwrap().accepted("RunInstances"),
        1,
        "log:\n{}",
        op.logs()
    );
}

#[tokio::test]
async fn adopt_fills_status_and_launches_nothing_and_observe_only_never_mutates() {
    let e = env("adopt", Duration::ZERO).await;
    let sdk = e.ec2.client().await;
    let run = sdk
        .run_instances()
        .image_id(&e.ami)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Medium)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    let id = run.instances()[0].instance_id().unwrap().to_string();
    e.ec2.reset_calls().await.unwrap();
    let op = e.operator();
    let manifest = |name: &str, id: &str, extra: &str| {
        format!(
            "apiVersion: fleet.valet.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: {name}}}\nspec:\n  environment: prod\n  instanceId: {id}\n{extra}"
        )
    };
    e.apply(&manifest(
        "adopted",
        &id,
        "  managementPolicy: ObserveOnly\n",
    ))
    .await;
    let st = e
        .wait("adopted", 60, "the instance observed", |s| {
            s.instance
                .as_ref()
                .is_some_and(|i| i.state.map(|s| s.as_str()) == Some("running"))
        })
        .await;
    let inst = st.instance.unwrap();
    assert_eq!(inst.instance_type.as_deref(), Some("t3.medium"));
    assert!(!inst.launched_by_operator);
    assert!(inst.private_ip.is_some());
    // A missing id: not ready, with a reason, and nothing launched.
    e.apply(&manifest("ghost", "i-0123456789abcdef0", "")).await;
    let st = e
        .wait("ghost", 60, "InstanceNotFound", |s| {
            cond(s, "Ready").is_some_and(|c| c.1 == "InstanceNotFound")
        })
        .await;
    assert!(
        cond(&st, "Ready")
            .unwrap()
            .2
            .contains("i-0123456789abcdef0")
    );
    // Let a few refreshes and reconciles pass, then count.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let calls = e.ec2.calls().await.unwrap();
    for action in [
        "RunInstances",
        "StartInstances",
        "StopInstances",
        "TerminateInstances",
        "CreateTags",
    ] {
        assert_eq!(
            calls.accepted(action),
            0,
            "{action} was called: {calls:?}\n{}",
            op.logs()
        );
    }
    // Deleting the observed Sandbox leaves the instance alone.
    e.sbx
        .delete("adopted", &DeleteParams::default())
        .await
        .unwrap();
    eventually(30, "the Sandbox to be gone", || async {
        e.sbx
            .get_opt("adopted")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let instances = e.instances().await;
    assert_eq!(
        instances
            .iter()
            .find(|i| i.instance_id() == Some(&id))
            .unwrap()
            .state()
            .unwrap()
            .name()
            .unwrap()
            .as_str(),
        "running"
    );
}

#[tokio::test]
async fn power_state_and_changes_made_outside_the_operator() {
    let e = env("power", Duration::from_secs(2)).await;
    let op = e.operator();
    e.apply(&e.launched("p-1", "")).await;
    // Status follows pending to running as EC2 reports it.
    e.wait("p-1", 60, "pending", |s| {
        s.instance
            .as_ref()
            .and_then(|i| i.state.map(|s| s.as_str()))
            == Some("pending")
    })
    .await;
    let st = e
        .wait("p-1", 60, "running", |s| {
            s.instance
                .as_ref()
                .and_then(|i| i.state.map(|s| s.as_str()))
                == Some("running")
        })
        .await;
    let id = st.instance.unwrap().id;
    assert!(st.last_started_at.is_some());

    // Declared stop: stopping, then stopped; Ready because that is what was declared.
    e.apply(&e.launched("p-1", "  powerState: Stopped\n")).await;
    e.wait("p-1", 60, "stopping", |s| {
        s.instance
            .as_ref()
            .and_then(|i| i.state.map(|s| s.as_str()))
            == Some("stopping")
    })
    .await;
    let st = e
        .wait("p-1", 60, "stopped and Ready", |s| {
            s.instance
                .as_ref()
                .and_then(|i| i.state.map(|s| s.as_str()))
                == Some("stopped")
                && is(s, "Ready", "True")
        })
        .await;
    assert_eq!(st.phase, Some(SandboxPhase::Stopped));
    assert_eq!(st.stop_reason.map(|r| r.as_str()), Some("Requested"));

    // Declared start.
    e.apply(&e.launched("p-1", "  powerState: Running\n")).await;
    e.wait("p-1", 60, "running again", |s| {
        s.instance
            .as_ref()
            .and_then(|i| i.state.map(|s| s.as_str()))
            == Some("running")
    })
    .await;

    // Stopped behind the operator's back while the spec says Running: started again, with an Event.
    e.ec2
        .client()
        .await
        .stop_instances()
        .instance_ids(&id)
        .send()
        .await
        .unwrap();
    eventually(60, "the RestartingAfterExternalStop event", || async {
        e.events("p-1")
            .await
            .iter()
            .any(|(r, _)| r == "RestartingAfterExternalStop")
            .then_some(())
    })
    .await;
    e.wait("p-1", 60, "running after the external stop", |s| {
        s.instance
            .as_ref()
            .and_then(|i| i.state.map(|s| s.as_str()))
            == Some("running")
    })
    .await;

    // Terminated behind its back: Failed with a reason, and never relaunched.
    e.ec2
        .client()
        .await
        .terminate_instances()
        .instance_ids(&id)
        .send()
        .await
        .unwrap();
    let st = e
        .wait("p-1", 60, "Failed", |s| {
            s.phase == Some(SandboxPhase::Failed)
        })
        .await;
    assert_eq!(st.failure_reason.as_deref(), Some("InstanceTerminated"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        e.ec2.calls().await.unwrap().accepted("RunInstances"),
        1,
        "{}",
        op.logs()
    );
    assert!(
        e.events("p-1")
            .await
            .iter()
            .any(|(r, _)| r == "InstanceTerminated")
    );
}

#[tokio::test]
async fn health_threshold_recovery_and_missing_token_secret() {
    let e = env("health", Duration::ZERO).await;
    let mut agent = Agent::start("v1", 0).await;
    let _op = e.operator();
    // First without the token Secret: reported by name.
    e.apply(&e.launched("h-1", &agent_spec(&agent))).await;
    let st = e
        .wait("h-1", 60, "TokenSecretMissing", |s| {
            cond(s, "AgentHealthy").is_some_and(|c| c.1 == "TokenSecretMissing")
        })
        .await;
    assert!(
        cond(&st, "AgentHealthy")
            .unwrap()
            .2
            .contains(&format!("{}/agent-token", e.ns))
    );
    e.agent_secret(&agent).await;
    e.wait("h-1", 60, "AgentHealthy", |s| {
        is(s, "AgentHealthy", "True") && s.phase == Some(SandboxPhase::Active)
    })
    .await;
    // The agent goes away: Unhealthy after failureThreshold (2) probes.
    agent.stop();
    let st = e
        .wait("h-1", 60, "Unhealthy", |s| is(s, "AgentHealthy", "False"))
        .await;
    assert_eq!(st.phase, Some(SandboxPhase::Unhealthy));
    assert!(st.agent.as_ref().unwrap().consecutive_failures >= 2);
    assert!(
        e.events("h-1")
            .await
            .iter()
            .any(|(r, _)| r == "AgentUnhealthy")
    );
}

#[tokio::test]
async fn auto_stop_when_idle_and_wake_by_annotation() {
    let e = env("autostop", Duration::ZERO).await;
    let agent = Agent::start("v1", 2).await;
    e.agent_secret(&agent).await;
    let _op = e.operator();
    e.apply(&e.launched(
        "idle-1",
        &format!("{}  autoStop: {{idleAfter: 1m}}\n", agent_spec(&agent)),
    ))
    .await;
    e.wait("idle-1", 60, "Active with workers", |s| {
        s.phase == Some(SandboxPhase::Active) && is(s, "Idle", "False")
    })
    .await;
    // Active workers keep it running; none for idleAfter stops it.
    agent.set_active(0);
    let st = e
        .wait("idle-1", 30, "idle clock started", |s| {
            s.idle_since.is_some()
        })
        .await;
    assert!(is(&st, "Idle", "True"));
    let st = e
        .wait("idle-1", 120, "auto-stopped", |s| {
            s.instance
                .as_ref()
                .and_then(|i| i.state.map(|s| s.as_str()))
                == Some("stopped")
        })
        .await;
    assert_eq!(st.stop_reason.map(|r| r.as_str()), Some("Idle"));
    assert_eq!(cond(&st, "Idle").unwrap().1, "IdleStopped");
    assert!(
        e.events("idle-1")
            .await
            .iter()
            .any(|(r, _)| r == "IdleStop")
    );
    // It stays stopped...
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(e.ec2.calls().await.unwrap().accepted("StartInstances"), 0);
    // ...until the start annotation carries a newer time.
    let patch = serde_json::json!({"metadata": {"annotations": {"fleet.valet.dev/start-requested-at": "2026-11-22T12:00:00Z"}}});
    e.sbx
        .patch("idle-1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let st = e
        .wait("idle-1", 60, "running again", |s| {
            s.instance
                .as_ref()
                .and_then(|i| i.state.map(|s| s.as_str()))
                == Some("running")
        })
        .await;
    assert_eq!(
        st.last_start_request.as_deref(),
        Some("2026-11-22T12:00:00Z")
    );
    assert!(e.events("idle-1").await.iter().any(|(r, _)| r == "Waking"));
}

#[tokio::test]
async fn image_tag_is_deployed_through_the_agent_and_a_failed_tag_is_not_retried() {
    let e = env("image", Duration::ZERO).await;
    let agent = Agent::start("v1", 0).await;
    e.agent_secret(&agent).await;
    let _op = e.operator();
    e.apply(&e.launched(
        "img-1",
        &format!("{}  image: {{tag: v2}}\n", agent_spec(&agent)),
    ))
    .await;
    let st = e
        .wait("img-1", 90, "v2 deployed", |s| {
            is(s, "ImageUpToDate", "True")
                && s.agent.as_ref().and_then(|a| a.image_tag.as_deref()) == Some("v2")
        })
        .await;
    assert_eq!(st.deploy.as_ref().unwrap().state.as_str(), "Succeeded");
    assert_eq!(
        st.deploy.as_ref().unwrap().previous_tag.as_deref(),
        Some("v1")
    );
    assert!(
        agent.docker_calls().contains("up tag=v2"),
        "{}",
        agent.docker_calls()
    );
    assert!(
        e.events("img-1")
            .await
            .iter()
            .any(|(r, _)| r == "DeploySucceeded")
    );

    // v3 fails its health check: the agent rolls back, the failure is recorded, no retry loop.
    agent.fail_health_for("v3");
    e.apply(&e.launched(
        "img-1",
        &format!("{}  image: {{tag: v3}}\n", agent_spec(&agent)),
    ))
    .await;
    let st = e
        .wait("img-1", 90, "v3 failed", |s| {
            s.deploy.as_ref().is_some_and(|d| {
                d.tag == "v3" && (d.state.as_str() == "RolledBack" || d.state.as_str() == "Failed")
            })
        })
        .await;
    assert_eq!(cond(&st, "ImageUpToDate").unwrap().1, "DeployFailed");
    let ups = |c: &str| c.lines().filter(|l| l.starts_with("up tag=v3")).count();
    let before = ups(&agent.docker_calls());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        ups(&agent.docker_calls()),
        before,
        "the failed tag was deployed again"
    );
    assert!(
        e.events("img-1")
            .await
            .iter()
            .any(|(r, _)| r == "DeployFailed")
    );
}

#[tokio::test]
async fn deletion_policies_and_the_orphan_sweep() {
    let e = env("delete", Duration::ZERO).await;
    let op = e.operator();
    e.apply(&e.launched("keep", "  deletionPolicy: Retain\n"))
        .await;
    e.apply(&e.launched("halt", "  deletionPolicy: Stop\n"))
        .await;
    let keep = e
        .wait("keep", 60, "running", |s| {
            s.instance
                .as_ref()
                .and_then(|i| i.state.map(|s| s.as_str()))
                == Some("running")
        })
        .await
        .instance
        .unwrap()
        .id;
    let halt = e
        .wait("halt", 60, "running", |s| {
            s.instance
                .as_ref()
                .and_then(|i| i.state.map(|s| s.as_str()))
                == Some("running")
        })
        .await
        .instance
        .unwrap()
        .id;
    e.sbx
        .delete("keep", &DeleteParams::default())
        .await
        .unwrap();
    e.sbx
        .delete("halt", &DeleteParams::default())
        .await
        .unwrap();
    for n in ["keep", "halt"] {
        eventually(60, "the Sandbox to be gone", || async {
            e.sbx.get_opt(n).await.unwrap().is_none().then_some(())
        })
        .await;
    }
    let state_of = |id: String| {
        let e = &e;
        async move {
            e.instances()
                .await
                .iter()
                .find(|i| i.instance_id() == Some(&id))
                .map(|i| i.state().unwrap().name().unwrap().as_str().to_string())
                .unwrap()
        }
    };
    assert!(matches!(
        state_of(halt.clone()).await.as_str(),
        "stopping" | "stopped"
    ));
    // A retained instance is released (the operator's tags removed), so the orphan sweep never
    // takes it for an orphan: it still runs well after the grace period.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(state_of(keep.clone()).await, "running", "{}", op.logs());

    // An instance tagged by the operator whose Sandbox never existed: terminated after the grace.
    let sdk = e.ec2.client().await;
    let tags = aws_sdk_ec2::types::TagSpecification::builder()
        .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("fleet.valet.dev/managed-by")
                .value("sandbox-operator")
                .build(),
        )
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("fleet.valet.dev/sandbox-uid")
                .value("00000000-0000-0000-0000-000000000000")
                .build(),
        )
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("fleet.valet.dev/namespace")
                .value(&e.ns)
                .build(),
        )
        .build();
    let orphan = sdk
        .run_instances()
        .image_id(&e.ami)
        .min_count(1)
        .max_count(1)
        .tag_specifications(tags)
        .send()
        .await
        .unwrap()
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_string();
    eventually(60, "the orphan to be terminated", || {
        let id = orphan.clone();
        let state_of = &state_of;
        async move { (state_of(id).await == "terminated").then_some(()) }
    })
    .await;
    assert!(op.logs().contains(&orphan));
    assert!(
        op.metrics()
            .await
            .contains("sandbox_operator_orphan_instances")
    );
}

#[tokio::test]
async fn aws_refusal_is_reported_without_a_retry_storm_and_a_new_generation_retries() {
    let e = env("refusal", Duration::ZERO).await;
    e.ec2
        .inject_fault(
            Fault::new("RunInstances", "InvalidAMIID.NotFound")
                .status(400)
                .message("The image id '[ami-0123]' does not exist")
                .until_cleared(),
        )
        .await
        .unwrap();
    let op = e.operator();
    e.apply(&e.launched("bad", "")).await;
    let st = e
        .wait("bad", 60, "LaunchFailed", |s| {
            cond(s, "Ready").is_some_and(|c| c.1 == "LaunchFailed")
        })
        .await;
    assert!(
        cond(&st, "Ready")
            .unwrap()
            .2
            .contains("InvalidAMIID.NotFound"),
        "{st:?}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let tries = e.ec2.calls().await.unwrap().faulted("RunInstances");
    assert!(
        tries <= 2,
        "RunInstances was retried {tries} times for a refusal\n{}",
        op.logs()
    );
    assert!(
        e.events("bad")
            .await
            .iter()
            .any(|(r, m)| r == "LaunchFailed" && m.contains("InvalidAMIID.NotFound"))
    );
    // Fixing the cause and editing the spec (a new generation) tries again.
    e.ec2.clear_faults().await.unwrap();
    e.apply(&e.launched("bad", "").replace("t3.large", "t3.xlarge"))
        .await;
    e.wait("bad", 60, "launched", |s| s.instance.is_some())
        .await;
}

#[tokio::test]
async fn throttling_is_transient_and_never_fails_a_sandbox() {
    let e = env("throttle", Duration::ZERO).await;
    e.ec2
        .set_throttle(
            sandbox_operator::testenv::ec2::ThrottleConfig::enabled()
                .bucket("run_instances", 2.0, 1.0)
                .bucket("describe", 3.0, 2.0)
                .bucket("describe_unfiltered", 3.0, 2.0),
        )
        .await
        .unwrap();
    let op = e.operator();
    for i in 0..6 {
        e.apply(&e.launched(&format!("t-{i}"), "")).await;
    }
    for i in 0..6 {
        e.wait(&format!("t-{i}"), 120, "the instance", |s| {
            s.instance
                .as_ref()
                .and_then(|i| i.state.map(|s| s.as_str()))
                == Some("running")
        })
        .await;
    }
    let list = e.sbx.list(&ListParams::default()).await.unwrap();
    for s in list.items {
        let st = s.status.unwrap_or_default();
        assert!(
            st.failure_reason.is_none() && st.phase != Some(SandboxPhase::Failed),
            "{st:?}"
        );
    }
    assert_eq!(e.instances().await.len(), 6, "{}", op.logs());
    let _ = Delays::default();
}

#[tokio::test]
async fn metrics_are_served() {
    let e = env("metrics", Duration::ZERO).await;
    let agent = Agent::start("v1", 1).await;
    e.agent_secret(&agent).await;
    let op = e.operator();
    e.apply(&e.launched("m-1", &agent_spec(&agent))).await;
    e.wait("m-1", 60, "Active", |s| {
        s.phase == Some(SandboxPhase::Active)
    })
    .await;
    let text = eventually(30, "per-sandbox gauges", || async {
        let t = op.metrics().await;
        t.contains("sandbox_operator_sandbox_active_workers")
            .then_some(t)
    })
    .await;
    for family in [
        "sandbox_operator_reconciles_total",
        "sandbox_operator_agent_probes_total",
        "sandbox_operator_sandbox_cpu_percent",
        "sandbox_operator_status_writes_total",
        "sandbox_operator_ec2",
    ] {
        assert!(text.contains(family), "/metrics lacks {family}:\n{text}");
    }
    assert!(
        text.contains(&format!(
            "sandbox_operator_sandbox_active_workers{{namespace=\"{}\",name=\"m-1\"}} 1",
            e.ns
        )),
        "{text}"
    );
    // A healthy, idle sandbox probed every second causes no status writes.
    let writes = |t: &str| -> u64 {
        t.lines()
            .find(|l| l.starts_with("sandbox_operator_status_writes_total{controller=\"sandbox\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let probes = |t: &str| -> f64 {
        t.lines()
            .filter(|l| l.starts_with("sandbox_operator_agent_probes_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = op.metrics().await;
    let status_before = e.status("m-1").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = op.metrics().await;
    let status_after = e.status("m-1").await;
    assert!(
        probes(&after) >= probes(&before) + 3.0,
        "the agent was not probed meanwhile:\n{after}"
    );
    assert_eq!(
        writes(&after),
        writes(&before),
        "probes that found nothing new wrote status:\n{}\nstatus before: {}\nstatus after: {}",
        op.logs(),
        serde_json::to_string(&status_before).unwrap(),
        serde_json::to_string(&status_after).unwrap()
    );
}

/// The Ready condition's (status, reason, message, observedGeneration).
fn ready_of(s: &SandboxStatus) -> Option<(String, String, String, Option<i64>)> {
    s.conditions.iter().find(|c| c.type_ == "Ready").map(|c| {
        (
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
            c.observed_generation,
        )
    })
}

#[tokio::test]
async fn every_sandbox_shows_status_at_once_while_launches_wait_for_the_clients_pacing() {
    let e = env("firststatus", Duration::ZERO).await;
    // The operator's own RunInstances bucket is tiny: one launch, then one per 5 s, so the
    // launches of 60 Sandboxes take five minutes. AWS (the endpoint) throttles nothing.
    let op = Operator::start(&e.ns, &e.ec2.url(), &["--ec2-buckets", "run=1/0.2"]);
    // `FIRST_STATUS_SANDBOXES=500` measures the figure the issue asks for (printed below).
    let n: usize = std::env::var("FIRST_STATUS_SANDBOXES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let names: Vec<String> = (0..n).map(|i| format!("fs-{i:03}")).collect();
    let manifests: Vec<String> = names.iter().map(|name| e.launched(name, "")).collect();
    futures::future::join_all(manifests.iter().map(|m| e.apply(m))).await;
    let applied = std::time::Instant::now();
    // Every one carries a phase, Ready=False with a reason, and its observedGeneration.
    let list = eventually(
        90 + n as u64 / 5,
        "a phase, Ready and observedGeneration on all of them",
        || async {
            let list = e.sbx.list(&ListParams::default()).await.ok()?;
            let all = list.items.len() == n
                && list.items.iter().all(|s| {
                    let st = s.status.clone().unwrap_or_default();
                    st.phase.is_some()
                        && st.observed_generation.is_some()
                        && st.observed_generation == s.metadata.generation
                        && ready_of(&st)
                            .is_some_and(|r| !r.1.is_empty() && r.3 == s.metadata.generation)
                });
            all.then_some(list)
        },
    )
    .await;
    let launched = e.ec2.calls().await.unwrap().accepted("RunInstances");
    eprintln!(
        "all {n} showed status {:.1} s after being applied; {launched} launched by then",
        applied.elapsed().as_secs_f64()
    );
    assert!(
        launched < n as u64 / 2,
        "the status must not wait for the launches: {launched} of {n} were launched already"
    );
    let mut paced = 0;
    for s in &list.items {
        let st = s.status.clone().unwrap_or_default();
        let (status, reason, message, _) = ready_of(&st).unwrap();
        assert_eq!(
            status,
            "False",
            "{}: {st:?}",
            s.metadata.name.as_deref().unwrap()
        );
        assert!(
            st.failure_reason.is_none() && st.phase != Some(SandboxPhase::Failed),
            "{st:?}"
        );
        if reason == "LaunchPaced" {
            paced += 1;
            assert_eq!(st.phase, Some(SandboxPhase::Provisioning));
            // With its turn known it says when; past the queue the bucket takes on (hundreds
            // applied at once) it says it asks again later.
            assert!(
                message.contains("client-side pacing")
                    && (message.contains("turn comes at") || message.contains("asks again later")),
                "{message}"
            );
            assert!(!message.contains("throttled by"), "{message}");
        } else {
            assert!(
                matches!(
                    reason.as_str(),
                    "PendingLaunch"
                        | "Launching"
                        | "InstanceNotRunning"
                        | "AgentUnhealthy"
                        | "AwaitingAgent"
                ),
                "unexpected reason {reason}: {message}"
            );
        }
    }
    assert!(
        paced >= n / 2,
        "only {paced} of {n} say the client's pacing holds their launch"
    );
    // The pacing is logged and counted as pacing, never as throttling: AWS throttled nothing.
    let text = op.metrics().await;
    let queued: f64 = text
        .lines()
        .filter(|l| {
            // queued: took a turn in line; refused: past the line, asks again later.
            l.starts_with("sandbox_operator_ec2_client_paced_total")
                && l.contains("RunInstances")
                && (l.contains("queued") || l.contains("refused"))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(queued >= paced as f64, "{text}");
    assert!(
        !text
            .lines()
            .any(|l| l.contains("outcome=\"throttled\"") && !l.ends_with(" 0")),
        "{text}"
    );
    let log = op.logs();
    for wrong in [
        "throttled (the account",
        "throttled by AWS",
        "RequestLimitExceeded",
    ] {
        assert!(!log.contains(wrong), "the log says {wrong:?}:\n{log}");
    }
    assert!(e.ec2.calls().await.unwrap().throttled.is_empty());
    // And the launches do go on, one per turn.
    eventually(60, "more launches", || async {
        (e.ec2.calls().await.unwrap().accepted("RunInstances") > launched).then_some(())
    })
    .await;
}

#[tokio::test]
async fn ec2s_eventual_consistency_never_fails_relaunches_or_leaks() {
    let e = env("consistency", Duration::from_secs(1)).await;
    let window = Duration::from_secs(40);
    e.ec2.set_consistency(window).await.unwrap();
    let op = e.operator();
    for name in ["ec-1", "ec-2", "ec-3"] {
        e.apply(&e.launched(name, "")).await;
    }
    // Everything every Sandbox showed, sampled until the window is over.
    let mut seen: Vec<(String, String)> = Vec::new();
    let sample = |seen: &mut Vec<(String, String)>, name: &str, st: &SandboxStatus| {
        let word = format!(
            "{:?} {} {:?}",
            st.phase,
            ready_of(st).map(|r| r.1).unwrap_or_default(),
            st.failure_reason
        );
        if seen.last().is_none_or(|(n, w)| n != name || *w != word) {
            seen.push((name.to_owned(), word));
        }
        assert!(
            st.phase != Some(SandboxPhase::Failed)
                && st.failure_reason.is_none()
                && !st.conditions.iter().any(|c| matches!(
                    c.reason.as_str(),
                    "InstanceNotFound" | "InstanceTerminated"
                )),
            "{name} reads a failure while EC2 does not show its instance yet: {st:?}\n{seen:?}"
        );
    };
    // The instances are launched, and EC2 does not show them yet.
    let ids = eventually(60, "three instances launched", || async {
        let mut ids = Vec::new();
        for name in ["ec-1", "ec-2", "ec-3"] {
            ids.push(e.status(name).await.instance.map(|i| i.id)?);
        }
        Some(ids)
    })
    .await;
    let hidden = e.ec2.consistency().await.unwrap().hidden;
    assert!(
        ids.iter().all(|id| hidden.contains(id)),
        "launched {ids:?}, yet EC2 showed some already ({hidden:?}): the machine is too slow for this test"
    );
    // Deleted meanwhile: its instance is terminated all the same.
    e.sbx
        .delete("ec-3", &DeleteParams::default())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        for name in ["ec-1", "ec-2"] {
            sample(&mut seen, name, &e.status(name).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A fresh operator process (no memory of its launches) in the window: the status's own
    // record of the launch keeps it from reading the instances as gone.
    let op = op.restart(&e.ns, &e.ec2.url(), &[]);
    loop {
        let hidden = e.ec2.consistency().await.unwrap().hidden;
        for name in ["ec-1", "ec-2"] {
            sample(&mut seen, name, &e.status(name).await);
        }
        if hidden.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for name in ["ec-1", "ec-2"] {
        let st = e
            .wait(name, 60, "running", |s| {
                s.instance
                    .as_ref()
                    .and_then(|i| i.state.map(|s| s.as_str()))
                    == Some("running")
            })
            .await;
        sample(&mut seen, name, &st);
    }
    assert!(
        seen.iter()
            .any(|(_, w)| w.contains("Launching") || w.contains("InstanceNotRunning")),
        "{seen:?}"
    );
    // Never launched again, never tagged after the fact.
    let calls = e.ec2.calls().await.unwrap();
    assert_eq!(
        calls.accepted("RunInstances"),
        3,
        "{calls:?}\n{}",
        op.logs()
    );
    assert_eq!(calls.accepted("CreateTags"), 0, "{calls:?}");
    // The deleted one is gone, and so is its instance.
    eventually(60, "ec-3 to be gone", || async {
        e.sbx.get_opt("ec-3").await.unwrap().is_none().then_some(())
    })
    .await;
    let state = eventually(60, "ec-3's instance terminated", || async {
        let out = e
            .ec2
            .client()
            .await
            .describe_instances()
            .instance_ids(&ids[2])
            .send()
            .await
            .ok()?;
        let state = out.reservations()[0].instances()[0]
            .state()?
            .name()?
            .as_str()
            .to_owned();
        matches!(state.as_str(), "shutting-down" | "terminated").then_some(state)
    })
    .await;
    assert!(!state.is_empty());
    assert_eq!(
        e.instances()
            .await
            .iter()
            .filter(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) == Some("running"))
            .count(),
        2
    );
}

#[tokio::test]
async fn deleting_sandboxes_logs_no_warning() {
    let e = env("quietdelete", Duration::from_secs(1)).await;
    // The periodic EC2 refresh as slow as in production (30 s): the cleanup's own describe is
    // the one that sees the instance terminated.
    let op = Operator::start(&e.ns, &e.ec2.url(), &["--ec2-refresh", "30s"]);
    let names = ["qd-1", "qd-2", "qd-3"];
    for name in names {
        e.apply(&e.launched(name, "")).await;
    }
    for name in names {
        e.wait(name, 60, "running", |s| {
            s.instance
                .as_ref()
                .and_then(|i| i.state.map(|s| s.as_str()))
                == Some("running")
        })
        .await;
    }
    let before = op.logs().len();
    for name in names {
        e.sbx.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in names {
        eventually(60, "the Sandbox to be gone", || async {
            e.sbx.get_opt(name).await.unwrap().is_none().then_some(())
        })
        .await;
    }
    // Past the requeues and EC2 changes still queued for the deleted objects.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let log = op.logs();
    let after = &log[before..];
    let warnings: Vec<&str> = after
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(
        warnings.is_empty(),
        "deleting logged warnings:\n{}",
        warnings.join("\n")
    );
    assert!(!after.contains("failed to remove finalizer"), "{after}");
    assert!(
        e.instances().await.iter().all(|i| {
            i.state().and_then(|s| s.name()).map(|n| n.as_str()) == Some("terminated")
        })
    );
}

// ---- Day-2 actions by annotation (and from the kubectl plugin). ----

fn last_action(s: &SandboxStatus, id: &str) -> Option<sandbox_operator::api::LastAction> {
    s.last_action.clone().filter(|a| a.request_id == id)
}

impl Env {
    async fn ask(&self, name: &str, action: &str, id: Option<&str>) {
        let mut ann = serde_json::json!({"fleet.valet.dev/action": action});
        if let Some(id) = id {
            ann["fleet.valet.dev/action-id"] = id.into();
        }
        let patch = serde_json::json!({"metadata": {"annotations": ann}});
        self.sbx
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    async fn annotations(&self, name: &str) -> std::collections::BTreeMap<String, String> {
        self.sbx
            .get(name)
            .await
            .unwrap()
            .metadata
            .annotations
            .unwrap_or_default()
    }

    async fn instance_state(&self, id: &str) -> String {
        self.instances()
            .await
            .into_iter()
            .find(|i| i.instance_id() == Some(id))
            .and_then(|i| {
                i.state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string())
            })
            .unwrap_or_default()
    }
}

#[tokio::test]
async fn day2_restart_adspower_probe_now_and_drain_by_annotation() {
    let e = env("day2", Duration::ZERO).await;
    let agent = Agent::start("v1", 0).await;
    e.agent_secret(&agent).await;
    let _op = e.operator();
    // Probes only every hour: whatever status learns after the first one, a probe-now brought.
    e.apply(&e.launched(
        "d2",
        &format!(
            "  agent: {{url: \"{}\", tokenSecretRef: {{name: agent-token, key: token}}, probeInterval: 1h, timeout: 2s}}\n",
            agent.url
        ),
    ))
    .await;
    e.wait("d2", 90, "Active", |s| {
        s.phase == Some(SandboxPhase::Active)
    })
    .await;

    // Restart AdsPower: the agent runs its adspower restart once; the request is recorded and
    // removed.
    assert_eq!(agent.adspower_restarts(), 0);
    e.ask("d2", "restart-adspower", Some("r-1")).await;
    let st = e
        .wait("d2", 60, "restart-adspower done", |s| {
            last_action(s, "r-1").is_some_and(|a| a.result != "InProgress")
        })
        .await;
    let a = last_action(&st, "r-1").unwrap();
    assert_eq!(
        (a.name.as_str(), a.result.as_str()),
        ("restart-adspower", "Succeeded"),
        "{a:?}"
    );
    assert!(a.message.as_deref().unwrap().contains("adspower"), "{a:?}");
    assert_eq!(agent.adspower_restarts(), 1, "restarted on the agent, once");
    eventually(30, "the request removed", || async {
        let a = e.annotations("d2").await;
        (!a.contains_key("fleet.valet.dev/action")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(agent.adspower_restarts(), 1, "done once, not per reconcile");

    // Probe now: the worker takes 3 jobs; nothing would probe for an hour, but the request
    // probes at once and status shows it.
    agent.set_active(3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        e.status("d2").await.agent.unwrap().active_workers,
        Some(0),
        "no probe of its own yet"
    );
    e.ask("d2", "probe", Some("p-1")).await;
    let st = e
        .wait("d2", 20, "probe-now result", |s| {
            last_action(s, "p-1").is_some_and(|a| a.result == "Succeeded")
        })
        .await;
    assert_eq!(st.agent.as_ref().unwrap().active_workers, Some(3));
    assert!(
        // Healthy, or Degraded on a test machine whose disk is 90% full.
        last_action(&st, "p-1")
            .unwrap()
            .message
            .unwrap()
            .starts_with("probed now: the agent is"),
        "{:?}",
        st.last_action
    );

    // Drain: the agent is asked and says so in its /health.
    assert_eq!(agent.health().await.draining_since, None);
    e.ask("d2", "drain", Some("dr-1")).await;
    let st = e
        .wait("d2", 60, "drain done", |s| {
            last_action(s, "dr-1").is_some_and(|a| a.result != "InProgress")
        })
        .await;
    assert_eq!(
        last_action(&st, "dr-1").unwrap().result,
        "Succeeded",
        "{:?}",
        st.last_action
    );
    assert!(agent.health().await.draining_since.is_some());
    assert!(
        st.agent.as_ref().unwrap().draining_since.is_some(),
        "status shows the drain: {:?}",
        st.agent
    );

    // An unknown action, without an id: it gets one, and is refused naming the accepted ones.
    e.ask("d2", "reboot", None).await;
    let st = e
        .wait("d2", 60, "reboot refused", |s| {
            s.last_action.as_ref().is_some_and(|a| a.name == "reboot")
        })
        .await;
    let a = st.last_action.unwrap();
    assert_eq!(
        (a.result.as_str(), a.reason.as_str()),
        ("Rejected", "UnknownAction")
    );
    assert!(!a.request_id.is_empty());
    assert!(
        a.message
            .unwrap()
            .contains("restart-adspower, probe, drain, terminate, terminate-force")
    );
    let events = e.events("d2").await;
    for reason in ["ActionStarted", "ActionSucceeded", "ActionRejected"] {
        assert!(
            events.iter().any(|(r, _)| r == reason),
            "{reason}: {events:?}"
        );
    }
}

#[tokio::test]
async fn day2_terminate_drains_first_and_force_from_the_plugin_skips_the_drain() {
    let e = env("day2-term", Duration::ZERO).await;
    let busy = Agent::start("v1", 2).await;
    let other = Agent::start("v1", 2).await;
    e.agent_secret(&busy).await;
    // Both agents read the same token file content (one per process id).
    assert_eq!(busy.token, other.token);
    let op = e.operator();
    // deletionPolicy Retain: a terminate request terminates all the same.
    e.apply(&e.launched(
        "t-drain",
        &format!("{}  deletionPolicy: Retain\n", agent_spec(&busy)),
    ))
    .await;
    e.apply(&e.launched("t-force", &agent_spec(&other))).await;
    let mut ids = std::collections::BTreeMap::new();
    for name in ["t-drain", "t-force"] {
        let st = e
            .wait(name, 90, "Active", |s| {
                s.phase == Some(SandboxPhase::Active)
            })
            .await;
        ids.insert(name, st.instance.unwrap().id);
    }

    // terminate: drains first; two jobs run, so nothing is terminated yet.
    e.ask("t-drain", "terminate", Some("t-1")).await;
    let st = e
        .wait("t-drain", 60, "draining", |s| {
            last_action(s, "t-1").is_some_and(|a| a.reason == "Draining")
        })
        .await;
    assert!(
        last_action(&st, "t-1")
            .unwrap()
            .message
            .unwrap()
            .contains("2 active workers"),
        "{:?}",
        st.last_action
    );
    eventually(30, "the drain seen in the agent's /health", || async {
        busy.health().await.draining_since.map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(e.instance_state(&ids["t-drain"]).await, "running");
    assert!(e.sbx.get_opt("t-drain").await.unwrap().is_some());
    // The jobs finish: the instance is terminated; the Sandbox stays, phase Terminated, as the
    // record (Retain did not keep the instance: the request asked for it).
    busy.set_active(0);
    let st = e
        .wait("t-drain", 90, "terminated", |s| {
            last_action(s, "t-1").is_some_and(|a| a.result == "Succeeded")
        })
        .await;
    assert_eq!(st.phase, Some(SandboxPhase::Terminated));
    assert_eq!(cond(&st, "Ready").unwrap().1, "Terminated");
    assert_eq!(e.instance_state(&ids["t-drain"]).await, "terminated");
    eventually(30, "the request removed", || async {
        let a = e.annotations("t-drain").await;
        (!a.contains_key("fleet.valet.dev/action")).then_some(())
    })
    .await;
    // Nothing is launched in its place.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(e.ec2.calls().await.unwrap().accepted("RunInstances"), 2);
    assert_eq!(
        e.status("t-drain").await.phase,
        Some(SandboxPhase::Terminated)
    );

    // The ledger's row says terminated, and keeps saying so once the Sandbox is deleted.
    let ledger = sandbox_operator::ledger::Ledger::connect(&op.ledger)
        .await
        .unwrap();
    let row_of = |name: &'static str| {
        let ledger = &ledger;
        async move {
            ledger
                .sandboxes()
                .await
                .unwrap()
                .into_iter()
                .find(|r| r.name == name)
        }
    };
    eventually(30, "the terminated row", || async {
        row_of("t-drain").await.filter(|r| r.status == "terminated")
    })
    .await;
    e.sbx
        .delete("t-drain", &DeleteParams::default())
        .await
        .unwrap();
    eventually(60, "t-drain deleted", || async {
        e.sbx
            .get_opt("t-drain")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let row = row_of("t-drain").await.expect("the row stays");
    assert_eq!(row.status, "terminated");
    assert_eq!(row.instance_id.as_deref(), Some(ids["t-drain"].as_str()));
    assert_eq!(row.ec2_status.as_deref(), Some("terminated"));

    // terminate --force from the real plugin: no drain although two jobs run.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-sandbox"))
        .args([
            "-n",
            &e.ns,
            "terminate",
            "t-force",
            "--force",
            "--timeout",
            "60s",
        ])
        .env("KUBECONFIG", support::control_plane().kubeconfig_path())
        .output()
        .expect("running kubectl-sandbox");
    let text = support::text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("terminate-force: Succeeded"), "{text}");
    assert_eq!(e.instance_state(&ids["t-force"]).await, "terminated");
    assert_eq!(
        e.status("t-force").await.phase,
        Some(SandboxPhase::Terminated)
    );
    assert_eq!(
        other.health().await.draining_since,
        None,
        "force never asked the agent to drain"
    );
    // A refused action exits non-zero with the reason.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-sandbox"))
        .args([
            "-n",
            &e.ns,
            "restart-adspower",
            "t-force",
            "--timeout",
            "60s",
        ])
        .env("KUBECONFIG", support::control_plane().kubeconfig_path())
        .output()
        .expect("running kubectl-sandbox");
    let text = support::text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("InstanceNotRunning"), "{text}");
    let events = e.events("t-drain").await;
    for reason in [
        "ActionStarted",
        "Terminating",
        "Terminated",
        "ActionSucceeded",
    ] {
        assert!(
            events.iter().any(|(r, _)| r == reason),
            "{reason}: {events:?}"
        );
    }
}
