//! Input checked where it is accepted, end to end with the real `sandbox-operator` binary.
//!
//! A launch's user data: against the shared control plane and a wrapped moto EC2 endpoint of the
//! test's own, a Sandbox whose user-data Secret or key is missing is held (Ready=False with a
//! reason naming the Secret and key) and never launched without it; once the key is there it
//! launches with exactly that user data. And the operator's config file: a webhook selector the
//! CRD would refuse stops the operator at start with a message saying what to fix.

use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams};
use sandbox_operator::api::{Sandbox, SandboxPhase, SandboxStatus};
use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions};

use crate::support::{self, Operator};

fn ready(s: &SandboxStatus) -> Option<(String, String, String)> {
    s.conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn wait_for(
    api: &Api<Sandbox>,
    name: &str,
    what: &str,
    f: impl Fn(&SandboxStatus) -> bool,
) -> SandboxStatus {
    let mut last = SandboxStatus::default();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok(s) = api.get(name).await {
                last = s.status.unwrap_or_default();
                if f(&last) {
                    return last.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!(
            "{name}: timed out waiting for {what}; last status: {}",
            serde_json::to_string_pretty(&last).unwrap()
        )
    })
}

async fn put_secret(secrets: &Api<Secret>, name: &str, data: serde_json::Value) {
    let s = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name},
        "stringData": data,
    });
    secrets
        .patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&s))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_launch_waits_for_its_user_data_secret_and_key_and_never_goes_without() {
    let client = support::client().await;
    let ns = support::namespace(&client, "user-data").await;
    let ec2 = Ec2Endpoint::start(Ec2EndpointOptions::default())
        .await
        .expect("EC2 endpoint");
    let ami = ec2.defaults().await.unwrap().ami;
    let sbx: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let op = Operator::start(&ns, &ec2.url(), &[]);

    let manifest = serde_json::json!({
        "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "Sandbox",
        "metadata": {"name": "booted"},
        "spec": {
            "environment": "staging",
            "instanceType": "t3.large",
            "launch": {
                "imageId": ami,
                "userDataSecretRef": {"name": "boot", "key": "cloud-init"},
            },
        },
    });
    sbx.patch(
        "booted",
        &PatchParams::apply("test").force(),
        &Patch::Apply(&manifest),
    )
    .await
    .unwrap();

    // No Secret at all.
    let st = wait_for(&sbx, "booted", "UserDataSecretMissing", |s| {
        ready(s).is_some_and(|r| r.1 == "UserDataSecretMissing")
    })
    .await;
    let (status, _, message) = ready(&st).unwrap();
    assert_eq!(status, "False");
    assert!(
        message.contains(&format!("{ns}/boot")) && message.contains("\"cloud-init\""),
        "the reason names the Secret and key: {message}"
    );
    assert_eq!(st.phase, Some(SandboxPhase::Provisioning));
    assert!(st.observed_generation.is_some());
    assert!(st.instance.is_none());

    // The Secret, without the key.
    put_secret(
        &secrets,
        "boot",
        serde_json::json!({"cloud_init": "#cloud-config\n"}),
    )
    .await;
    let st = wait_for(&sbx, "booted", "UserDataKeyMissing", |s| {
        ready(s).is_some_and(|r| r.1 == "UserDataKeyMissing")
    })
    .await;
    let (status, _, message) = ready(&st).unwrap();
    assert_eq!(status, "False");
    assert!(
        message.contains(&format!("{ns}/boot")) && message.contains("\"cloud-init\""),
        "the reason names the Secret and key: {message}"
    );
    let instance_running = st
        .conditions
        .iter()
        .find(|c| c.type_ == "InstanceRunning")
        .unwrap();
    assert_eq!(instance_running.reason, "UserDataKeyMissing");

    // A while later: still held, and EC2 never saw a launch.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let st = sbx.get("booted").await.unwrap().status.unwrap_or_default();
    assert_eq!(ready(&st).unwrap().1, "UserDataKeyMissing");
    let calls = ec2.calls().await.unwrap();
    assert_eq!(
        (
            calls.accepted("RunInstances"),
            calls.faulted("RunInstances")
        ),
        (0, 0),
        "launched without its user data\n{}",
        op.logs()
    );

    // The Events say so, once per reason.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let evs: Vec<(String, String)> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some("booted"))
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect();
    for reason in ["UserDataSecretMissing", "UserDataKeyMissing"] {
        assert!(
            evs.iter().any(|(r, m)| r == reason && m.contains("boot")),
            "no {reason} Event: {evs:?}"
        );
    }

    // The key is added: it launches, once, with exactly that user data.
    let user_data = "#cloud-config\nruncmd:\n  - echo booted\n";
    put_secret(
        &secrets,
        "boot",
        serde_json::json!({"cloud_init": "#cloud-config\n", "cloud-init": user_data}),
    )
    .await;
    let st = wait_for(&sbx, "booted", "a launched instance", |s| {
        s.instance.is_some()
    })
    .await;
    let id = st.instance.unwrap().id;
    assert_eq!(ec2.calls().await.unwrap().accepted("RunInstances"), 1);
    let attr = ec2
        .client()
        .await
        .describe_instance_attribute()
        .instance_id(&id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let got = attr
        .user_data()
        .and_then(|v| v.value())
        .map(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("base64 user data")
        })
        .expect("the instance has user data");
    assert_eq!(String::from_utf8(got).unwrap(), user_data);
    let st = wait_for(&sbx, "booted", "Ready no longer about user data", |s| {
        ready(s).is_some_and(|r| !r.1.starts_with("UserData"))
    })
    .await;
    assert!(st.failure_reason.is_none(), "{st:?}");
}

#[test]
fn a_config_selector_the_crd_would_refuse_stops_the_operator_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(
        &path,
        "webhook:\n  secretFile: /nonexistent\n  environments:\n    staging:\n      namespace: fleet\n      selector:\n        matchExpressions: [{key: tier, operator: Inn, values: [gold]}]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox-operator"))
        .args(["run", "--config"])
        .arg(&path)
        .env("KUBECONFIG", dir.path().join("no-kubeconfig"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "started with a bad selector:\n{text}"
    );
    assert!(
        text.contains("webhook.environments.staging.selector")
            && text.contains("unknown operator \"Inn\"")
            && text.contains("In, NotIn, Exists or DoesNotExist"),
        "{text}"
    );
}
