//! What users install and read first: the examples applied to the real API server, the Helm
//! chart (lint, template, its RBAC proven sufficient by running the operator as its
//! ServiceAccount), leader election between two real operator processes, and the kubectl plugin.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use sandbox_operator::api::{DeployPhase, Sandbox, SandboxDeploy, SecretBundle};
use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions};

use crate::fleet::Agent;
use crate::support::{self, Operator, eventually, kubectl, text};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

pub(crate) fn root(p: &str) -> PathBuf {
    Path::new(ROOT).join(p)
}

pub(crate) fn read(p: &str) -> String {
    std::fs::read_to_string(root(p)).unwrap_or_else(|e| panic!("reading {p}: {e}"))
}

/// kubectl, asserting success.
pub(crate) fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(args, stdin);
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// kubectl off the test's runtime thread: the agents' worker stand-ins are served by that
/// runtime, so a blocking kubectl call (a `wait`) would starve them.
pub(crate) async fn kubectl_async(args: &[&str], stdin: Option<&str>) -> String {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let stdin = stdin.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        kubectl_ok(&a, stdin.as_deref())
    })
    .await
    .unwrap()
}

pub(crate) fn helm_bin() -> PathBuf {
    let version = read("tests/tools/helm/VERSION");
    let p = sandbox_operator::testenv::cache_dir()
        .join("bin")
        .join(format!("helm-{}", version.trim()));
    assert!(
        p.exists(),
        "{} is missing: run `make tools` (hack/install-tools.sh helm)",
        p.display()
    );
    p
}

pub(crate) fn helm(args: &[&str]) -> std::process::Output {
    Command::new(helm_bin())
        .args(args)
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("sandbox-operator-helm"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("sandbox-operator-helm"),
        )
        .env(
            "HELM_DATA_HOME",
            std::env::temp_dir().join("sandbox-operator-helm"),
        )
        .output()
        .expect("running helm")
}

pub(crate) fn helm_template(args: &[&str]) -> String {
    let chart = root("charts/sandbox-operator");
    let mut all = vec!["template", "t", chart.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = helm(&all);
    assert!(
        out.status.success(),
        "helm {}: {}",
        all.join(" "),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The documents of a multi-document YAML stream, as JSON values (empty ones skipped).
pub(crate) fn docs(yaml: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|d| {
            let v = serde_yaml::Value::deserialize(d).ok()?;
            if v.is_null() {
                return None;
            }
            serde_json::to_value(v).ok()
        })
        .collect()
}

use serde::Deserialize;

pub(crate) fn find<'a>(docs: &'a [serde_json::Value], kind: &str) -> Option<&'a serde_json::Value> {
    docs.iter().find(|d| d["kind"] == kind)
}

#[test]
fn chart_lints_renders_and_ships_the_crds() {
    let chart = root("charts/sandbox-operator");
    let out = helm(&["lint", "--strict", chart.to_str().unwrap()]);
    assert!(out.status.success(), "helm lint: {}", text(&out));

    // The chart's CRDs are the generated ones.
    for entry in std::fs::read_dir(root("crds")).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            read(&format!("charts/sandbox-operator/crds/{name}")),
            "charts/sandbox-operator/crds/{name} differs from crds/{name}: cp crds/*.yaml charts/sandbox-operator/crds/"
        );
    }

    // Defaults: one replica, no leader election, hardened pod, probes on the HTTP port.
    let d = docs(&helm_template(&["--namespace", "ops"]));
    let dep = find(&d, "Deployment").expect("a Deployment");
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(!args.contains(&"--leader-elect"), "{args:?}");
    assert_eq!(dep["spec"]["strategy"]["type"], "Recreate");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(find(&d, "Service").is_some());
    assert!(
        find(&d, "Role").is_none(),
        "no lease Role without leader election"
    );
    assert!(find(&d, "ServiceMonitor").is_none());
    assert!(find(&d, "NetworkPolicy").is_none());

    // Two replicas: leader election on, with its Role; optional objects when asked.
    let d = docs(&helm_template(&[
        "--namespace",
        "ops",
        "--set",
        "replicaCount=2",
        // Two replicas: each with its own SQLite ledger (the default claim takes one writer).
        "--set",
        "persistence.enabled=false",
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::123456789012:role/op",
        "--set-json",
        r#"config={"webhook":{"secretFile":"/etc/hmac","environments":{"staging":{"namespace":"fleet"}}}}"#,
    ]));
    let dep = find(&d, "Deployment").unwrap();
    let args = dep["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--leader-elect"), "{args}");
    assert!(args.contains("--lease-namespace=ops"), "{args}");
    assert!(args.contains("--config=/etc/sandbox-operator/config.yaml"));
    assert!(find(&d, "Role").is_some() && find(&d, "RoleBinding").is_some());
    assert!(find(&d, "ServiceMonitor").is_some() && find(&d, "NetworkPolicy").is_some());
    assert_eq!(
        find(&d, "ServiceAccount").unwrap()["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/op"
    );
    // The rendered config is one the operator accepts.
    let cm = find(&d, "ConfigMap").unwrap();
    let cfg: sandbox_operator::operator::webhook::OperatorConfig =
        serde_yaml::from_str(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    assert!(cfg.webhook.is_some());

    // values.schema.json refuses what it should.
    for bad in [
        "replicaCount=two",
        "operator.poll=soon",
        "image.pullPolicy=Sometimes",
        "noSuchKey=1",
    ] {
        let out = helm(&["template", "t", chart.to_str().unwrap(), "--set", bad]);
        assert!(!out.status.success(), "{bad} was accepted");
    }

    // Every object the chart renders is valid for the API server (CRD-backed kinds aside).
    let cp = support::control_plane();
    let rendered = helm_template(&[
        "--namespace",
        "default",
        "--set",
        "replicaCount=2",
        "--set",
        "persistence.enabled=false",
    ]);
    let out = Command::new("kubectl")
        .args(["--kubeconfig", cp.kubeconfig_path().to_str().unwrap()])
        .args(["apply", "--dry-run=server", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(rendered.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "server dry run: {}", text(&out));
}

/// Every example, applied to the real API server as a server-side dry run (the CRDs' schemas
/// and CEL rules accept them), and the GitOps overlays through kustomize.
#[tokio::test]
async fn every_example_passes_a_server_side_dry_run() {
    let client = support::client().await;
    let ns = support::namespace(&client, "examples").await;
    for f in [
        "examples/sandbox-launched.yaml",
        "examples/sandbox-adopted.yaml",
        "examples/sandbox-stopped.yaml",
        "examples/sandbox-bootstrap.yaml",
        "examples/sandboxdeploy.yaml",
        "examples/sandboxpool.yaml",
        "examples/secretbundle.yaml",
    ] {
        let p = root(f);
        let out = kubectl_ok(
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "-n",
                &ns,
                "-f",
                p.to_str().unwrap(),
            ],
            None,
        );
        assert!(out.contains("serverside-applied"), "{f}: {out}");
    }
    for (overlay, ns, sandboxes) in [
        ("staging", "fleet-staging", 2),
        ("production", "fleet-production", 4),
    ] {
        let _ = kubectl(&["create", "namespace", ns], None);
        let p = root(&format!("examples/gitops/overlays/{overlay}"));
        let rendered = kubectl_ok(&["kustomize", p.to_str().unwrap()], None);
        let d = docs(&rendered);
        let sbx: Vec<_> = d.iter().filter(|d| d["kind"] == "Sandbox").collect();
        assert_eq!(sbx.len(), sandboxes, "{overlay}");
        for s in &sbx {
            assert!(
                s["spec"]["image"].is_null(),
                "GitOps Sandboxes leave image.tag out"
            );
            assert_eq!(s["metadata"]["namespace"], ns);
        }
        let out = kubectl_ok(
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "-k",
                p.to_str().unwrap(),
            ],
            None,
        );
        assert!(out.contains("serverside-applied"), "{overlay}: {out}");
    }
    // The operator's config example parses as the operator parses it.
    let cfg: sandbox_operator::operator::webhook::OperatorConfig =
        serde_yaml::from_str(&read("examples/operator-config.yaml")).unwrap();
    assert_eq!(cfg.webhook.unwrap().environments.len(), 2);
}

/// The launched-sandbox example, for real: the operator launches its instance at the local EC2
/// endpoint and reaches a real agent. Only what cannot exist here is substituted: the endpoint's
/// AMI, subnet and security group, the agent's token and its loopback URL; the key pair and
/// instance profile, which the endpoint's empty account lacks, are left out.
pub async fn launched_example(ec2: &Ec2Endpoint, agent: &Agent) -> String {
    let d = ec2.defaults().await.unwrap();
    read("examples/sandbox-launched.yaml")
        .replace("ami-0123456789abcdef0", &d.ami)
        .replace("subnet-0123456789abcdef0", &d.subnet)
        .replace("sg-0123456789abcdef0", &d.security_group)
        .replace("    keyName: ghosthands\n", "")
        .replace("    iamInstanceProfile: sandbox-worker\n", "")
        .replace("replace-with-the-agent-token", &agent.token)
        .replace(
            "urlTemplate: \"http://{privateIp}:{port}\"",
            &format!("url: \"{}\"", agent.url),
        )
        .replace("probeInterval: 30s", "probeInterval: 1s")
        .replace("timeout: 5s", "timeout: 1s")
}

#[tokio::test]
async fn launched_example_becomes_ready_for_real() {
    let client = support::client().await;
    let ns = support::namespace(&client, "example-launched").await;
    let ec2 =
        Ec2Endpoint::start(Ec2EndpointOptions::default().with_transitions(Duration::from_secs(1)))
            .await
            .unwrap();
    let agent = Agent::start("v1", 0).await;
    let _op = Operator::start(&ns, &ec2.url(), &[]);
    let manifest = launched_example(&ec2, &agent).await;
    kubectl_ok(
        &["apply", "--server-side", "-n", &ns, "-f", "-"],
        Some(&manifest),
    );
    let wait = tokio::task::spawn_blocking({
        let ns = ns.clone();
        move || {
            let out = kubectl(
                &[
                    "wait",
                    "-n",
                    &ns,
                    "sandbox/worker-1",
                    "--for=condition=Ready",
                    "--timeout=90s",
                ],
                None,
            );
            let yaml = text(&kubectl(
                &["get", "-n", &ns, "sandbox/worker-1", "-o", "yaml"],
                None,
            ));
            (out, yaml)
        }
    });
    let (out, yaml) = wait.await.unwrap();
    assert!(out.status.success(), "{}\n{yaml}", text(&out));
    let out = kubectl_async(&["get", "fleet", "-n", &ns], None).await;
    assert!(out.contains("worker-1"), "{out}");
    assert_eq!(ec2.calls().await.unwrap().accepted("RunInstances"), 1);
}

/// A kubeconfig for `sa` in `ns`, from a token the API server issued (`kubectl create token`).
pub(crate) fn service_account_kubeconfig(ns: &str, sa: &str, dir: &Path) -> PathBuf {
    let token = kubectl_ok(&["create", "token", sa, "-n", ns, "--duration=2h"], None);
    let cp = support::control_plane();
    let mut cfg: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(cp.kubeconfig_path()).unwrap()).unwrap();
    let user = serde_yaml::to_value(serde_json::json!([{
        "name": "operator-sa",
        "user": {"token": token.trim()},
    }]))
    .unwrap();
    cfg["users"] = user;
    if let Some(ctxs) = cfg["contexts"].as_sequence_mut() {
        for c in ctxs {
            c["context"]["user"] = "operator-sa".into();
        }
    }
    let path = dir.join("sa.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    path
}

/// `sandbox-operator run` with a given kubeconfig (Operator::start always uses the admin one).
pub(crate) struct SaOperator {
    child: std::process::Child,
    log: PathBuf,
    /// Its HTTP address (`/healthz`, `/metrics`).
    pub(crate) http: std::net::SocketAddr,
}

impl SaOperator {
    pub(crate) fn start(
        kubeconfig: &Path,
        ns: &str,
        ec2: &str,
        dir: &Path,
        extra: &[&str],
    ) -> SaOperator {
        Self::start_with_env(kubeconfig, ns, ec2, dir, extra, &[])
    }

    /// [`Self::start`] with more environment variables (e.g. POD_NAME and POD_NAMESPACE).
    pub(crate) fn start_with_env(
        kubeconfig: &Path,
        ns: &str,
        ec2: &str,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> SaOperator {
        let log = dir.join("operator.log");
        let port = sandbox_operator::testenv::free_port();
        let http: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandbox-operator"));
        cmd.args(["run", "--namespace", ns, "--ec2-endpoint", ec2])
            .env(
                "SANDBOX_OPERATOR_LEDGER",
                format!("sqlite://{}", dir.join("ledger.db").display()),
            )
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .args(["--ec2-refresh", "1s", "--poll", "500ms", "--resync", "20s"])
            .args([
                "--orphan-sweep",
                "1s",
                "--orphan-grace",
                "3s",
                "--region",
                "us-east-1",
            ])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("SANDBOX_OPERATOR_LOG", "info,sandbox_operator=debug")
            .envs(env.iter().copied());
        let child = sandbox_operator::testenv::process::spawn_tied(cmd, &log).unwrap();
        SaOperator { child, log, http }
    }
    pub(crate) fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// The process has not exited.
    pub(crate) fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for SaOperator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- operator (as its ServiceAccount) ----\n{}",
                self.logs()
            );
        }
    }
}

/// The chart's RBAC applied to the real API server; the operator runs as that ServiceAccount and
/// all three controllers do their work (a Sandbox becomes Ready, a SecretBundle syncs, a
/// SandboxDeploy succeeds, leader election holds its Lease) with no request refused. What it may
/// not do is checked with `kubectl auth can-i`.
#[tokio::test]
async fn chart_rbac_is_enough_and_no_more() {
    let client = support::client().await;
    let ns = support::namespace(&client, "chart-rbac").await;
    let release = format!("rbac-{}", &ns[ns.len().saturating_sub(12)..]);
    let full = format!("{release}-op");
    let rbac = helm_template(&[
        "--namespace",
        &ns,
        "--set",
        &format!("fullnameOverride={full}"),
        "--set",
        "leaderElection.enabled=true",
        "--show-only",
        "templates/serviceaccount.yaml",
        "--show-only",
        "templates/rbac.yaml",
    ]);
    kubectl_async(&["apply", "-f", "-"], Some(&rbac)).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(&ns, &full, dir.path());

    let ec2 =
        Ec2Endpoint::start(Ec2EndpointOptions::default().with_transitions(Duration::from_secs(1)))
            .await
            .unwrap();
    let agent = Agent::start("v1", 0).await;
    let op = SaOperator::start(
        &kubeconfig,
        &ns,
        &ec2.url(),
        dir.path(),
        &[
            "--leader-elect",
            "--lease-namespace",
            &ns,
            "--lease-name",
            "sandbox-operator",
        ],
    );
    let manifest = launched_example(&ec2, &agent).await;
    kubectl_ok(
        &["apply", "--server-side", "-n", &ns, "-f", "-"],
        Some(&manifest),
    );
    let sbx: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    eventually(
        90,
        "worker-1 Ready as the chart's ServiceAccount",
        || async {
            let s = sbx.get("worker-1").await.ok()?.status?;
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await;

    // SecretBundle: reads Secrets, writes its status, pushes to the agent (no Fly.io app here).
    let bundle = read("examples/secretbundle.yaml")
        .split("\n---\n")
        .filter(|d| !d.contains("kind: SecretBundle"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    kubectl_ok(
        &["apply", "--server-side", "-n", &ns, "-f", "-"],
        Some(&bundle),
    );
    kubectl_ok(
        &["apply", "--server-side", "-n", &ns, "-f", "-"],
        Some(
            "apiVersion: fleet.valet.dev/v1alpha1\nkind: SecretBundle\nmetadata: {name: worker-env}\nspec:\n  sources: [{secretName: worker-secrets}]\n  targets:\n    sandboxes: {selector: {matchLabels: {app.kubernetes.io/part-of: ghosthands}}, restartServices: [worker]}\n",
        ),
    );
    let bundles: Api<SecretBundle> = Api::namespaced(client.clone(), &ns);
    eventually(60, "the SecretBundle Ready", || async {
        let s = bundles.get("worker-env").await.ok()?.status?;
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await;

    // SandboxDeploy: selects worker-1, sets its image.tag with its own field manager, succeeds.
    let deploy = read("examples/sandboxdeploy.yaml")
        .replace("paused: true", "paused: false")
        .replace("drainTimeout: 5m", "drainTimeout: 10s");
    kubectl_ok(
        &["apply", "--server-side", "-n", &ns, "-f", "-"],
        Some(&deploy),
    );
    let deploys: Api<SandboxDeploy> = Api::namespaced(client.clone(), &ns);
    eventually(120, "the SandboxDeploy Succeeded", || async {
        let s = deploys.get("deploy-2f1c9e7").await.ok()?.status?;
        (s.phase == Some(DeployPhase::Succeeded)).then_some(())
    })
    .await;

    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease = leases.get("sandbox-operator").await.unwrap();
    assert!(lease.spec.unwrap().holder_identity.is_some());
    let logs = op.logs();
    for refused in ["code: 403", "forbidden", "Forbidden"] {
        assert!(!logs.contains(refused), "a request was refused:\n{logs}");
    }

    // No broader than needed.
    let who = format!("--as=system:serviceaccount:{ns}:{full}");
    let can = |verb: &str, what: &str, in_ns: &str| -> bool {
        // "sandboxes.fleet.valet.dev/status" is a subresource, "leases.../name" a named object.
        let mut args = vec!["auth", "can-i", who.as_str(), "-n", in_ns, verb];
        let sub;
        match what.rsplit_once('/') {
            Some((r, s)) if s == "status" || s == "finalizers" => {
                sub = format!("--subresource={s}");
                args.push(r);
                args.push(&sub);
            }
            _ => args.push(what),
        }
        let out = kubectl(&args, None);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for (verb, what) in [
        ("patch", "sandboxes.fleet.valet.dev"),
        ("patch", "sandboxes.fleet.valet.dev/status"),
        ("update", "sandboxes.fleet.valet.dev/finalizers"),
        ("create", "sandboxdeploys.fleet.valet.dev"),
        // A SandboxPool creates and deletes its members.
        ("create", "sandboxes.fleet.valet.dev"),
        ("delete", "sandboxes.fleet.valet.dev"),
        ("patch", "sandboxpools.fleet.valet.dev"),
        ("patch", "sandboxpools.fleet.valet.dev/status"),
        ("watch", "secrets"),
        ("create", "events.events.k8s.io"),
        ("update", "leases.coordination.k8s.io/sandbox-operator"),
    ] {
        assert!(can(verb, what, &ns), "should be allowed: {verb} {what}");
    }
    for (verb, what, in_ns) in [
        ("create", "secrets", ns.as_str()),
        ("update", "secrets", ns.as_str()),
        ("delete", "secrets", ns.as_str()),
        ("update", "sandboxes.fleet.valet.dev/status", ns.as_str()),
        ("patch", "sandboxdeploys.fleet.valet.dev", ns.as_str()),
        ("update", "sandboxes.fleet.valet.dev", ns.as_str()),
        ("delete", "sandboxpools.fleet.valet.dev", ns.as_str()),
        ("patch", "secretbundles.fleet.valet.dev", ns.as_str()),
        ("list", "pods", ns.as_str()),
        ("list", "configmaps", ns.as_str()),
        ("create", "events", ns.as_str()),
        (
            "update",
            "leases.coordination.k8s.io/someone-else",
            ns.as_str(),
        ),
        (
            "get",
            "leases.coordination.k8s.io/sandbox-operator",
            "default",
        ),
        (
            "create",
            "customresourcedefinitions.apiextensions.k8s.io",
            "default",
        ),
    ] {
        assert!(
            !can(verb, what, in_ns),
            "should be refused: {verb} {what} in {in_ns}"
        );
    }
    let _ = kubectl(
        &[
            "delete",
            "clusterrole,clusterrolebinding",
            &full,
            "--wait=false",
        ],
        None,
    );
}

/// Two replicas with leader election: one acts; killed, the other takes over within the lease
/// duration (plus one retry period), and no EC2 call is made twice.
#[tokio::test]
async fn leader_election_one_acts_and_the_other_takes_over() {
    let client = support::client().await;
    let ns = support::namespace(&client, "leader").await;
    let ec2 =
        Ec2Endpoint::start(Ec2EndpointOptions::default().with_transitions(Duration::from_secs(1)))
            .await
            .unwrap();
    let agent = Agent::start("v1", 0).await;
    let lease_duration = Duration::from_secs(4);
    let flags = |id: &str| -> Vec<String> {
        [
            "--leader-elect",
            "--lease-namespace",
            &ns,
            "--lease-identity",
            id,
            "--lease-duration",
            "4s",
            "--renew-deadline",
            "3s",
            "--retry-period",
            "500ms",
        ]
        .map(String::from)
        .to_vec()
    };
    let (fa, fb) = (flags("replica-a"), flags("replica-b"));
    let (fa, fb): (Vec<&str>, Vec<&str>) = (
        fa.iter().map(String::as_str).collect(),
        fb.iter().map(String::as_str).collect(),
    );
    let mut a = Operator::start(&ns, &ec2.url(), &fa);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = || async {
        leases
            .get_opt("sandbox-operator")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    };
    eventually(30, "replica-a holds the lease", || async {
        (holder().await.as_deref() == Some("replica-a")).then_some(())
    })
    .await;
    let b = Operator::start(&ns, &ec2.url(), &fb);

    let manifest = launched_example(&ec2, &agent).await;
    kubectl_ok(
        &["apply", "--server-side", "-n", &ns, "-f", "-"],
        Some(&manifest),
    );
    let sbx: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let ready = |name: &'static str| {
        let sbx = sbx.clone();
        async move {
            let s = sbx.get(name).await.ok()?.status?;
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        }
    };
    eventually(90, "worker-1 Ready", || ready("worker-1")).await;
    assert!(
        b.logs().contains("held by another replica") && !b.logs().contains("controllers starting"),
        "the standby must not act:\n{}",
        b.logs()
    );
    assert_eq!(holder().await.as_deref(), Some("replica-a"));
    assert_eq!(ec2.calls().await.unwrap().accepted("RunInstances"), 1);

    // Kill the leader as a crash would; the standby takes over.
    a.kill();
    let killed = Instant::now();
    eventually(30, "replica-b holds the lease", || async {
        (holder().await.as_deref() == Some("replica-b")).then_some(())
    })
    .await;
    let took = killed.elapsed();
    eprintln!(
        "leader election: takeover {took:?} after the kill (lease duration {lease_duration:?})"
    );
    assert!(
        took <= lease_duration + Duration::from_millis(1500),
        "takeover took {took:?}"
    );
    // The new leader acts: a second sandbox launches; the first is neither relaunched nor
    // touched.
    let second = manifest
        .replace("name: worker-1\n", "name: worker-2\n")
        .replace("name: worker-1-agent-token", "name: worker-2-agent-token");
    kubectl_ok(
        &["apply", "--server-side", "-n", &ns, "-f", "-"],
        Some(&second),
    );
    eventually(90, "worker-2 Ready under replica-b", || ready("worker-2")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = ec2.calls().await.unwrap();
    assert_eq!(
        calls.accepted("RunInstances"),
        2,
        "one launch per sandbox, none repeated"
    );
    for action in ["StartInstances", "StopInstances", "TerminateInstances"] {
        assert_eq!(calls.accepted(action), 0, "{action}");
    }
    assert!(b.logs().contains("acquired the lease"));
}

fn plugin(ns: &str, args: &[&str]) -> String {
    let cp = support::control_plane();
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-sandbox"))
        .args(["-n", ns])
        .args(args)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .output()
        .expect("running kubectl-sandbox");
    assert!(
        out.status.success(),
        "kubectl sandbox {}: {}",
        args.join(" "),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The plugin's actions land on the objects as the controllers expect them.
#[tokio::test]
async fn kubectl_plugin_actions_and_tree() {
    let client = support::client().await;
    let ns = support::namespace(&client, "plugin").await;
    for f in [
        "examples/sandbox-stopped.yaml",
        "examples/sandboxdeploy.yaml",
    ] {
        let p = root(f);
        kubectl_async(
            &[
                "apply",
                "--server-side",
                "-n",
                &ns,
                "-f",
                p.to_str().unwrap(),
            ],
            None,
        )
        .await;
    }
    let sbx: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let deploys: Api<SandboxDeploy> = Api::namespaced(client.clone(), &ns);
    let power = |s: Sandbox| format!("{:?}", s.spec.power_state);

    plugin(&ns, &["start", "worker-nightly"]);
    assert_eq!(power(sbx.get("worker-nightly").await.unwrap()), "Running");
    plugin(&ns, &["stop", "worker-nightly"]);
    assert_eq!(power(sbx.get("worker-nightly").await.unwrap()), "Stopped");

    let before = jiff::Timestamp::now();
    plugin(&ns, &["wake", "worker-nightly"]);
    let s = sbx.get("worker-nightly").await.unwrap();
    let woke: jiff::Timestamp = s.metadata.annotations.unwrap()
        [sandbox_operator::api::START_REQUESTED_ANNOTATION]
        .parse()
        .unwrap();
    assert!(woke >= before.round(jiff::Unit::Second).unwrap() - jiff::SignedDuration::from_secs(1));

    plugin(&ns, &["approve", "deploy-2f1c9e7"]);
    assert!(!deploys.get("deploy-2f1c9e7").await.unwrap().spec.paused);
    plugin(&ns, &["abort", "deploy-2f1c9e7"]);
    plugin(&ns, &["retry", "deploy-2f1c9e7"]);
    let ann = deploys
        .get("deploy-2f1c9e7")
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap();
    assert_eq!(ann[sandbox_operator::api::ABORT_ANNOTATION], "true");
    assert!(ann.contains_key(sandbox_operator::api::RETRY_ANNOTATION));

    let tree = plugin(&ns, &["tree"]);
    assert!(tree.starts_with(&format!("{ns}\n")), "{tree}");
    for want in [
        "dev (1 sandboxes)",
        "worker-nightly",
        "deploys",
        "deploy-2f1c9e7 tag 2f1c9e7",
    ] {
        assert!(tree.contains(want), "{want} missing from:\n{tree}");
    }
    // A missing object is an error with a non-zero exit.
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-sandbox"))
        .args(["-n", &ns, "wake", "no-such-sandbox"])
        .env("KUBECONFIG", support::control_plane().kubeconfig_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
}
