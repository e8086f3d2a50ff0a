//! The chart as a user runs it, on a real node: `helm install` with the image `make image`
//! builds (imported into the node's containerd), the pod Ready through its probes as user 65532
//! on a read-only root filesystem, holding its Lease, a Sandbox reconciled to Ready against the
//! test's EC2 endpoint, the CI webhook and `/metrics` answered through the Service's endpoint,
//! `helm upgrade` to another tag with never two operators at once, and `helm uninstall` leaving
//! the CRDs, the Sandbox and its instance alone.
//!
//! The node has host networking only and no kube-proxy (see `sandbox_operator::testenv::node`):
//! the release sets `hostNetwork: true`, points the pod at the API server with
//! `KUBERNETES_SERVICE_HOST=127.0.0.1`, and the test reaches the Service through its
//! EndpointSlice: the endpoint is the operator pod on this node, so its port is on loopback.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use sandbox_operator::api::{Sandbox, SandboxDeploy};
use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions};

use crate::fleet::Agent;
use crate::support;

const EXE: &str = "/usr/local/bin/sandbox-operator";

fn root(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// The crate's version: `make image`'s default tag.
fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// The image archive: `SANDBOX_OPERATOR_IMAGE` (`make test` sets it to the one its
/// `test-image` step builds), else the one `make image` wrote.
fn image_archive() -> PathBuf {
    let p = std::env::var_os("SANDBOX_OPERATOR_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root("target"));
            target
                .join("image")
                .join(format!("sandbox-operator-{}.oci.tar", version()))
        });
    assert!(
        p.is_file(),
        "{} is missing: run `make image` (or `make test-image`) first",
        p.display()
    );
    p
}

fn helm(args: &[&str]) -> Output {
    let version = std::fs::read_to_string(root("tests/tools/helm/VERSION")).unwrap();
    let bin = sandbox_operator::testenv::cache_dir()
        .join("bin")
        .join(format!("helm-{}", version.trim()));
    assert!(
        bin.exists(),
        "{} is missing: run `make tools`",
        bin.display()
    );
    let home = std::env::temp_dir().join("sandbox-operator-helm");
    Command::new(bin)
        .args(args)
        .env("KUBECONFIG", support::control_plane().kubeconfig_path())
        .env("HELM_CACHE_HOME", &home)
        .env("HELM_CONFIG_HOME", &home)
        .env("HELM_DATA_HOME", &home)
        .output()
        .expect("running helm")
}

async fn helm_ok(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    let text = support::text(&out);
    assert!(out.status.success(), "helm failed: {text}");
    text
}

fn sign(secret: &str, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The one Ready operator pod of the release, once there is exactly one and it is Ready.
async fn ready_pod(pods: &Api<Pod>, selector: &str, not: Option<&str>) -> Option<Pod> {
    let list = pods
        .list(&ListParams::default().labels(selector))
        .await
        .ok()?;
    let live: Vec<Pod> = list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    match live.as_slice() {
        [p] if ready(p) && p.metadata.name.as_deref() != not => Some(p.clone()),
        _ => None,
    }
}

/// The Service's endpoint for the operator pod: the port of its `http` endpoint (ready, naming
/// the pod). The pod is on the host network of this node, so that port is on loopback.
async fn service_endpoint(client: &kube::Client, ns: &str, svc: &str, pod: &str) -> Option<u16> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let list = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={svc}")))
        .await
        .ok()?;
    list.items.iter().find_map(|s| {
        let ours = s.endpoints.iter().flatten().any(|e| {
            e.target_ref.as_ref().and_then(|r| r.name.as_deref()) == Some(pod)
                && e.conditions.as_ref().and_then(|c| c.ready) == Some(true)
        });
        if !ours {
            return None;
        }
        s.ports
            .as_ref()?
            .iter()
            .find(|p| p.name.as_deref() == Some("http"))
            .and_then(|p| p.port)
            .map(|p| p as u16)
    })
}

/// The uid line and the root mount's options of a process, from /proc.
fn process_identity(pid: i32) -> (String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .collect::<Vec<_>>()
        .join(" ");
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    let root_opts = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .and_then(|l| l.split(' ').nth(5))
        .unwrap_or_default()
        .to_string();
    (uid, root_opts)
}

/// What a failed wait shows: the release's pods (phase, conditions, container states), the
/// namespace's Events, each pod's container logs and the end of the kubelet's and containerd's
/// logs.
async fn diagnose(client: &kube::Client, ns: &str) -> String {
    let node = support::node();
    let mut out = String::new();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    for p in pods
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        let name = p.metadata.name.clone().unwrap_or_default();
        out.push_str(&format!(
            "---- pod {name}: {}\n---- its logs:\n{}\n",
            serde_json::to_string(&p.status).unwrap_or_default(),
            node.pod_logs(ns, &name)
        ));
    }
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    for e in events
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        out.push_str(&format!(
            "event {} {}: {}\n",
            e.involved_object.name.unwrap_or_default(),
            e.reason.unwrap_or_default(),
            e.message.unwrap_or_default()
        ));
    }
    out.push_str(&format!(
        "---- kubelet:\n{}\n---- containerd:\n{}\n",
        node.log_tail("kubelet", 30),
        node.log_tail("containerd", 15)
    ));
    out
}

/// Polls `f` until it returns `Some`, or panics after `secs` with `what` and [`diagnose`].
async fn until<T, F, Fut>(client: &kube::Client, ns: &str, secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {secs}s waiting for {what}\n{}",
                diagnose(client, ns).await
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn chart_installs_runs_upgrades_and_uninstalls_on_a_real_node() {
    let image = image_archive();
    let node = support::node();
    eprintln!(
        "figure: node start-up (containerd, kubelet, controller manager, scheduler; Node Ready) {:?}",
        node.startup
    );
    let cp = support::control_plane();
    let client = support::client().await;
    let ns = support::namespace(&client, "chart-node").await;
    let tag = version();
    let upgrade_tag = format!("{tag}-upgrade");
    node.import_image(&image)
        .expect("importing the operator image");
    node.tag_image(
        &format!("docker.io/library/sandbox-operator:{tag}"),
        &format!("docker.io/library/sandbox-operator:{upgrade_tag}"),
    )
    .expect("tagging the image for the upgrade");

    // What the operator works against: the EC2 endpoint, one agent, the webhook's HMAC secret.
    let ec2 =
        Ec2Endpoint::start(Ec2EndpointOptions::default().with_transitions(Duration::from_secs(1)))
            .await
            .expect("EC2 endpoint");
    let ami = ec2.defaults().await.unwrap().ami;
    let agent = Agent::start("v1", 0).await;
    let webhook_secret = "chart-node-webhook-secret-0123";
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for (name, key, value) in [
        ("agent-token", "token", agent.token.as_str()),
        ("ci-webhook", "secret", webhook_secret),
    ] {
        let s: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}, "stringData": {key: value},
        }))
        .unwrap();
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }

    let release = format!("op{}", std::process::id());
    let full = format!("{release}-sandbox-operator");
    let port = sandbox_operator::testenv::free_port();
    let api_port = cp.server().rsplit(':').next().unwrap().to_string();
    let values = serde_json::json!({
        "image": {"tag": tag},
        "hostNetwork": true,
        // The ledger's claim binds to the hostPath PersistentVolume made below (no provisioner).
        "persistence": {"storageClass": "-"},
        "service": {"port": port},
        "leaderElection": {"enabled": true, "leaseDuration": "15s", "renewDeadline": "10s", "retryPeriod": "1s"},
        "operator": {
            "watchNamespace": ns, "ec2Endpoint": ec2.url(), "region": "us-east-1",
            "ec2Refresh": "1s", "ec2BatchWindow": "50ms", "poll": "500ms", "resync": "20s",
            "logLevel": "info,sandbox_operator=debug",
        },
        "config": {"webhook": {
            "secretRef": {"namespace": ns, "name": "ci-webhook", "key": "secret"},
            "maxSkew": "5m",
            "environments": {"staging": {
                "namespace": ns, "selector": {"environment": "staging"},
                "strategy": {"maxUnavailable": 1}, "autoDeploy": false,
            }},
        }},
        "extraEnv": [
            // No kube-proxy on this node: the API server's own address, not the ClusterIP.
            {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
            {"name": "KUBERNETES_SERVICE_PORT", "value": api_port},
            {"name": "AWS_ACCESS_KEY_ID", "value": "testing"},
            {"name": "AWS_SECRET_ACCESS_KEY", "value": "testing"},
            {"name": "AWS_EC2_METADATA_DISABLED", "value": "true"},
        ],
    });
    let dir = tempfile::tempdir().unwrap();
    let values_path = dir.path().join("values.yaml");
    std::fs::write(&values_path, serde_yaml::to_string(&values).unwrap()).unwrap();
    let values_arg = values_path.display().to_string();
    let chart = root("charts/sandbox-operator").display().to_string();

    // The ledger's volume: a hostPath PersistentVolume bound ahead to the chart's claim, owned by
    // the pod's user (a hostPath is not chowned by fsGroup).
    let ledger_dir = dir.path().join("ledger-volume");
    std::fs::create_dir(&ledger_dir).unwrap();
    std::os::unix::fs::chown(&ledger_dir, Some(65532), Some(65532)).unwrap();
    let pv_name = format!("{ns}-ledger");
    let pv: k8s_openapi::api::core::v1::PersistentVolume =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": pv_name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": ledger_dir.display().to_string(), "type": "Directory"},
                "claimRef": {"namespace": ns, "name": format!("{full}-data")},
            },
        }))
        .unwrap();
    let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(client.clone());
    pvs.create(&PostParams::default(), &pv).await.unwrap();
    let ledger_file = ledger_dir.join("ledger.db");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let selector = format!("app.kubernetes.io/instance={release}");
    let logs = |pod: &str| node.pod_logs(&ns, pod);

    // ---- helm install: the pod Ready through its probes. ----
    let installed = Instant::now();
    helm_ok(&["install", &release, &chart, "-n", &ns, "-f", &values_arg]).await;
    let pod = until(&client, &ns, 180, "the operator pod Ready", || {
        let pods = pods.clone();
        let selector = selector.clone();
        async move { ready_pod(&pods, &selector, None).await }
    })
    .await;
    let to_ready = installed.elapsed();
    let pod_name = pod.metadata.name.clone().unwrap();
    eprintln!("figure: helm install -> operator pod Ready in {to_ready:?}");
    let st = pod.status.clone().unwrap();
    let cs = &st.container_statuses.clone().unwrap()[0];
    assert!(cs.ready, "{cs:?}");
    assert_eq!(cs.restart_count, 0, "restarted:\n{}", logs(&pod_name));
    assert!(
        cs.image.ends_with(&format!("sandbox-operator:{tag}")),
        "{}",
        cs.image
    );
    let spec = pod.spec.clone().unwrap();
    let sc = spec.containers[0].security_context.clone().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert!(
        spec.containers[0].readiness_probe.is_some() && spec.containers[0].liveness_probe.is_some()
    );

    // The process itself: user 65532, root filesystem mounted read-only.
    let pids = node.container_processes(EXE);
    assert_eq!(pids.len(), 1, "one operator process: {pids:?}");
    let (uid, root_opts) = process_identity(pids[0]);
    assert_eq!(
        uid, "65532 65532 65532 65532",
        "real, effective, saved, fs uid"
    );
    assert!(
        root_opts.split(',').any(|o| o == "ro"),
        "root mount options: {root_opts}"
    );

    // ---- Its Lease. ----
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = |leases: Api<Lease>| async move {
        leases
            .get_opt("sandbox-operator")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    };
    until(&client, &ns, 30, "the pod holding the Lease", || {
        let leases = leases.clone();
        let pod_name = pod_name.clone();
        async move { (holder(leases).await.as_deref() == Some(pod_name.as_str())).then_some(()) }
    })
    .await;

    // ---- A Sandbox to Ready against the EC2 endpoint and the agent. ----
    let sbx: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let yaml = format!(
        "apiVersion: fleet.valet.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: web-1}}\nspec:\n  environment: staging\n  instanceType: t3.large\n  launch: {{imageId: {ami}}}\n  agent: {{url: \"{}\", tokenSecretRef: {{name: agent-token, key: token}}, probeInterval: 1s, timeout: 1s, failureThreshold: 2}}\n",
        agent.url
    );
    let json: serde_json::Value =
        serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(&yaml).unwrap()).unwrap();
    sbx.patch(
        "web-1",
        &PatchParams::apply("test").force(),
        &Patch::Apply(&json),
    )
    .await
    .unwrap();
    let is_ready = |s: &Sandbox| {
        s.status.as_ref().is_some_and(|st| {
            st.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    };
    let sandbox = until(&client, &ns, 120, "Sandbox web-1 Ready", || {
        let sbx = sbx.clone();
        async move { sbx.get("web-1").await.ok().filter(is_ready) }
    })
    .await;
    eprintln!(
        "figure: helm install -> first Sandbox Ready in {:?}",
        installed.elapsed()
    );
    let instance_id = sandbox
        .status
        .as_ref()
        .and_then(|s| s.instance.as_ref())
        .map(|i| i.id.clone())
        .expect("an instance id in status");

    // ---- The CI webhook and /metrics through the Service. ----
    let svc: Api<Service> = Api::namespaced(client.clone(), &ns);
    svc.get(&full).await.expect("the release's Service");
    let svc_port = until(
        &client,
        &ns,
        60,
        "the Service's endpoint for the pod",
        || {
            let client = client.clone();
            let (ns, full, pod_name) = (ns.clone(), full.clone(), pod_name.clone());
            async move { service_endpoint(&client, &ns, &full, &pod_name).await }
        },
    )
    .await;
    assert_eq!(svc_port, port);
    let http = reqwest::Client::new();
    let hook = format!(
        "http://127.0.0.1:{svc_port}{}",
        sandbox_operator::operator::webhook::PATH
    );
    let body = serde_json::to_vec(&serde_json::json!({
        "event": "ghosthands.deploy_ready", "image_tag": "v2", "commit_sha": "abc123",
        "timestamp": k8s_openapi::jiff::Timestamp::now().to_string(),
    }))
    .unwrap();
    let post = |sig: String| {
        http.post(&hook)
            .header("content-type", "application/json")
            .header("x-gh-event", "deploy_ready")
            .header("x-gh-environment", "staging")
            .header("x-gh-webhook-signature", sig)
            .body(body.clone())
            .send()
    };
    let bad = post(sign("not-the-secret", &body)).await.unwrap();
    assert_eq!(bad.status(), 401);
    let v: serde_json::Value = bad.json().await.expect("a JSON refusal");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("signature")),
        "{v}"
    );
    let good = post(sign(webhook_secret, &body)).await.unwrap();
    let status = good.status();
    let text = good.text().await.unwrap();
    assert_eq!(status, 202, "{text}\n{}", logs(&pod_name));
    let deploys: Api<SandboxDeploy> = Api::namespaced(client.clone(), &ns);
    let d = deploys
        .get("staging-v2")
        .await
        .expect("the webhook's SandboxDeploy");
    assert!(d.spec.paused, "autoDeploy off: created paused");
    let metrics = http
        .get(format!("http://127.0.0.1:{svc_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // This operator's own figures: its reconciles, and the agent's report of the Sandbox.
    assert!(
        metrics.contains("sandbox_operator_reconciles_total{controller=\"sandbox\"}")
            && metrics.contains(&format!(
                "sandbox_operator_sandbox_cpu_percent{{namespace=\"{ns}\",name=\"web-1\"}}"
            )),
        "{metrics}"
    );

    // ---- helm upgrade to another tag: the old operator stops before the new one starts. ----
    // Sampled throughout: operator processes on the node, Ready pods, Lease holders seen.
    let stop = Arc::new(AtomicBool::new(false));
    let max_procs = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let stop = stop.clone();
        let max_procs = max_procs.clone();
        let (pods, leases, selector) = (pods.clone(), leases.clone(), selector.clone());
        tokio::spawn(async move {
            let mut holders: Vec<String> = Vec::new();
            let mut max_ready = 0;
            while !stop.load(Ordering::SeqCst) {
                let n = support::node().container_processes(EXE).len();
                max_procs.fetch_max(n, Ordering::SeqCst);
                if let Ok(list) = pods.list(&ListParams::default().labels(&selector)).await {
                    max_ready = max_ready.max(list.items.iter().filter(|p| ready(p)).count());
                }
                if let Some(h) = holder(leases.clone()).await
                    && holders.last() != Some(&h)
                {
                    holders.push(h);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (holders, max_ready)
        })
    };
    // The ledger is on the claim's volume, not in the pod.
    let ledger_before = std::fs::metadata(&ledger_file)
        .unwrap_or_else(|e| panic!("the ledger on the hostPath volume: {e}"));
    helm_ok(&[
        "upgrade",
        &release,
        &chart,
        "-n",
        &ns,
        "-f",
        &values_arg,
        "--set",
        &format!("image.tag={upgrade_tag}"),
    ])
    .await;
    let new_pod = until(&client, &ns, 180, "the upgraded pod Ready", || {
        let pods = pods.clone();
        let selector = selector.clone();
        let old = pod_name.clone();
        async move { ready_pod(&pods, &selector, Some(&old)).await }
    })
    .await;
    let new_name = new_pod.metadata.name.clone().unwrap();
    // The pod asks for the new tag (the runtime may report either name: both tags are the one
    // image).
    let new_image = &new_pod.spec.as_ref().unwrap().containers[0].image;
    assert_eq!(
        new_image.as_deref(),
        Some(format!("sandbox-operator:{upgrade_tag}").as_str())
    );
    until(&client, &ns, 60, "the new pod holding the Lease", || {
        let leases = leases.clone();
        let new_name = new_name.clone();
        async move { (holder(leases).await.as_deref() == Some(new_name.as_str())).then_some(()) }
    })
    .await;
    // The new pod writes the same ledger file: the history outlived the pod replacement.
    let ledger_after = std::fs::metadata(&ledger_file).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&ledger_after),
        std::os::unix::fs::MetadataExt::ino(&ledger_before),
        "the ledger file was replaced"
    );
    assert!(
        ledger_after.len() >= ledger_before.len(),
        "the ledger shrank"
    );
    stop.store(true, Ordering::SeqCst);
    let (holders, max_ready) = watcher.await.unwrap();
    assert!(
        max_procs.load(Ordering::SeqCst) <= 1,
        "two operator processes at once during the upgrade"
    );
    assert!(max_ready <= 1, "two Ready operator pods at once");
    // The holders seen, in order: the old pod (or none, once it released), then the new one.
    let named: Vec<&String> = holders.iter().filter(|h| !h.is_empty()).collect();
    assert_eq!(
        named,
        vec![&pod_name, &new_name],
        "Lease holders seen: {holders:?}"
    );
    let deployment: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let strategy = deployment
        .get(&full)
        .await
        .unwrap()
        .spec
        .unwrap()
        .strategy
        .unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("Recreate"));
    // The Sandbox went on: still Ready, the same instance.
    let st = sbx.get("web-1").await.unwrap();
    assert!(is_ready(&st));
    assert_eq!(
        st.status.unwrap().instance.map(|i| i.id).as_deref(),
        Some(instance_id.as_str())
    );

    // ---- helm uninstall: the CRDs, the Sandbox and its instance stay. ----
    helm_ok(&[
        "uninstall",
        &release,
        "-n",
        &ns,
        "--wait",
        "--timeout",
        "120s",
    ])
    .await;
    until(&client, &ns, 60, "the operator process gone", || async {
        support::node()
            .container_processes(EXE)
            .is_empty()
            .then_some(())
    })
    .await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "sandboxes.fleet.valet.dev",
        "sandboxdeploys.fleet.valet.dev",
        "secretbundles.fleet.valet.dev",
    ] {
        crds.get(name)
            .await
            .unwrap_or_else(|e| panic!("CRD {name} gone: {e}"));
    }
    let st = sbx.get("web-1").await.expect("the Sandbox stays");
    assert!(st.metadata.deletion_timestamp.is_none());
    let out = ec2
        .client()
        .await
        .describe_instances()
        .instance_ids(&instance_id)
        .send()
        .await
        .unwrap();
    let state = out.reservations()[0].instances()[0]
        .state()
        .and_then(|s| s.name())
        .map(|n| n.as_str().to_string());
    assert_eq!(state.as_deref(), Some("running"), "the instance stays");
    let left = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap();
    assert!(
        left.items.is_empty()
            || left
                .items
                .iter()
                .all(|p| p.metadata.deletion_timestamp.is_some())
    );
}
