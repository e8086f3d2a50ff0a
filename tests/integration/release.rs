//! What a release ships beyond the binary (issue 16): the chart's options (the ledger on a volume
//! or in PostgreSQL, RBAC scoped to the watched namespace, the webhook's Ingress and secret, the
//! PrometheusRule and the Grafana dashboard), the values schema refusing bad values before
//! anything is created, the IAM policy against the EC2 calls the code makes, the metrics named by
//! the alerts, the dashboard and the README against a real `/metrics` scrape, and `make dist`'s
//! tarball installed into a scratch root.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::ship::{docs, find, helm, helm_template, kubectl_ok, read, root};
use crate::support::{self, kubectl, text};

fn all<'a>(d: &'a [Value], kind: &str) -> Vec<&'a Value> {
    d.iter().filter(|d| d["kind"] == kind).collect()
}

fn container(d: &[Value]) -> &Value {
    &find(d, "Deployment").expect("a Deployment")["spec"]["template"]["spec"]["containers"][0]
}

fn env<'a>(d: &'a [Value], name: &str) -> &'a Value {
    container(d)["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name}"))
}

fn volume<'a>(d: &'a [Value], name: &str) -> &'a Value {
    find(d, "Deployment").unwrap()["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

fn args(d: &[Value]) -> Vec<String> {
    container(d)["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The ledger outlives the pod: a PersistentVolumeClaim (size, class, or an existing claim) with
/// one writer, or PostgreSQL with the URL from an existing Secret, never in the pod spec or argv.
#[test]
fn chart_keeps_the_ledger_on_a_volume_or_in_postgres() {
    // Defaults: SQLite on a claim of the chart's, kept on uninstall; Recreate; URL in the env.
    let d = docs(&helm_template(&["--namespace", "ops"]));
    let pvc = find(&d, "PersistentVolumeClaim").expect("a PersistentVolumeClaim");
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "1Gi");
    assert_eq!(pvc["spec"]["accessModes"][0], "ReadWriteOnce");
    assert!(pvc["spec"]["storageClassName"].is_null(), "{pvc}");
    assert_eq!(
        pvc["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    assert_eq!(
        volume(&d, "data")["persistentVolumeClaim"]["claimName"],
        pvc["metadata"]["name"]
    );
    assert_eq!(
        env(&d, "SANDBOX_OPERATOR_LEDGER")["value"],
        "sqlite:///var/lib/sandbox-operator/ledger.db"
    );
    assert!(
        !args(&d).iter().any(|a| a.starts_with("--ledger")),
        "{:?}",
        args(&d)
    );
    let mounts = container(&d)["volumeMounts"].to_string();
    assert!(mounts.contains("/var/lib/sandbox-operator"), "{mounts}");
    assert_eq!(
        find(&d, "Deployment").unwrap()["spec"]["strategy"]["type"],
        "Recreate"
    );

    // Size and class; "-" is the empty class (a pre-bound PersistentVolume).
    let d = docs(&helm_template(&[
        "--set",
        "persistence.size=5Gi",
        "--set",
        "persistence.storageClass=fast-ssd",
    ]));
    let pvc = find(&d, "PersistentVolumeClaim").unwrap();
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "5Gi");
    assert_eq!(pvc["spec"]["storageClassName"], "fast-ssd");
    let d = docs(&helm_template(&["--set", "persistence.storageClass=-"]));
    assert_eq!(
        find(&d, "PersistentVolumeClaim").unwrap()["spec"]["storageClassName"],
        ""
    );

    // An existing claim: used, none created.
    let d = docs(&helm_template(&[
        "--set",
        "persistence.existingClaim=fleet-ledger",
    ]));
    assert!(find(&d, "PersistentVolumeClaim").is_none());
    assert_eq!(
        volume(&d, "data")["persistentVolumeClaim"]["claimName"],
        "fleet-ledger"
    );

    // Persistence off: an emptyDir, as before; then each replica has a file of its own, so
    // more than one is allowed.
    let d = docs(&helm_template(&["--set", "persistence.enabled=false"]));
    assert!(find(&d, "PersistentVolumeClaim").is_none());
    assert!(volume(&d, "data")["emptyDir"].is_object());
    let d = docs(&helm_template(&[
        "--set",
        "persistence.enabled=false",
        "--set",
        "replicaCount=2",
    ]));
    assert!(find(&d, "PersistentVolumeClaim").is_none());

    // With leader election but the SQLite file, still one writer: Recreate.
    let d = docs(&helm_template(&["--set", "leaderElection.enabled=true"]));
    assert_eq!(
        find(&d, "Deployment").unwrap()["spec"]["strategy"]["type"],
        "Recreate"
    );

    // PostgreSQL: the URL from the Secret by secretKeyRef; no claim; more replicas allowed
    // (leader election keeps one writer) and rolled without downtime.
    let rendered = helm_template(&[
        "--set",
        "ledger.mode=postgres",
        "--set",
        "ledger.postgres.existingSecret=fleet-ledger-db",
        "--set",
        "ledger.postgres.key=DATABASE_URL",
        "--set",
        "replicaCount=2",
    ]);
    let d = docs(&rendered);
    assert_eq!(
        env(&d, "SANDBOX_OPERATOR_LEDGER")["valueFrom"]["secretKeyRef"],
        serde_json::json!({"name": "fleet-ledger-db", "key": "DATABASE_URL"})
    );
    assert!(env(&d, "SANDBOX_OPERATOR_LEDGER")["value"].is_null());
    assert!(find(&d, "PersistentVolumeClaim").is_none());
    assert!(volume(&d, "data")["emptyDir"].is_object());
    assert!(!rendered.contains("postgres://"), "{rendered}");
    assert!(args(&d).contains(&"--leader-elect".to_string()));
    assert!(find(&d, "Deployment").unwrap()["spec"]["strategy"].is_null());

    // Off.
    let d = docs(&helm_template(&["--set", "ledger.mode=off"]));
    assert_eq!(env(&d, "SANDBOX_OPERATOR_LEDGER")["value"], "off");
}

/// The RBAC rules of every Role/ClusterRole in `d` that grant something on `resource`, by the
/// role's namespace ("" for a ClusterRole).
fn grants(d: &[Value], resource: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in d
        .iter()
        .filter(|r| r["kind"] == "Role" || r["kind"] == "ClusterRole")
    {
        let ns = r["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        for rule in r["rules"].as_array().unwrap() {
            if rule["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == resource)
            {
                out.entry(ns.clone()).or_default().extend(
                    rule["verbs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap().to_string()),
                );
            }
        }
    }
    out
}

/// With `operator.watchNamespace` the chart grants by Roles only: everything the controllers
/// need in the watched namespace, SandboxDeploys and delivery records in each webhook
/// environment's namespace, the Lease in its own; Secrets readable only in the watched
/// namespace; no ClusterRole. Proven on the real API server with `kubectl auth can-i`.
#[tokio::test]
async fn chart_rbac_with_a_watched_namespace_is_roles_in_those_namespaces_only() {
    let client = support::client().await;
    let ops = support::namespace(&client, "rbac-ops").await;
    let fleet = support::namespace(&client, "rbac-fleet").await;
    let prod = support::namespace(&client, "rbac-prod").await;
    let other = support::namespace(&client, "rbac-other").await;
    let full = format!("scoped-{}", &fleet[fleet.len().saturating_sub(8)..]);
    let config = serde_json::json!({"webhook": {"environments": {
        "staging": {"namespace": fleet},
        "production": {"namespace": prod},
    }}})
    .to_string();
    let rendered = helm_template(&[
        "--namespace",
        &ops,
        "--set",
        &format!("fullnameOverride={full}"),
        "--set",
        &format!("operator.watchNamespace={fleet}"),
        "--set",
        "leaderElection.enabled=true",
        "--set-json",
        &format!("config={config}"),
        "--show-only",
        "templates/serviceaccount.yaml",
        "--show-only",
        "templates/rbac.yaml",
    ]);
    let d = docs(&rendered);
    assert!(find(&d, "ClusterRole").is_none(), "{rendered}");
    assert!(find(&d, "ClusterRoleBinding").is_none(), "{rendered}");
    let role_ns: BTreeSet<&str> = all(&d, "Role")
        .iter()
        .map(|r| r["metadata"]["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(
        role_ns,
        BTreeSet::from([fleet.as_str(), prod.as_str(), ops.as_str()])
    );
    for b in all(&d, "RoleBinding") {
        assert_eq!(b["subjects"][0]["namespace"], ops.as_str());
        assert_eq!(b["subjects"][0]["name"], full.as_str());
    }
    let secrets = grants(&d, "secrets");
    assert_eq!(
        secrets.keys().collect::<Vec<_>>(),
        vec![&fleet],
        "Secrets readable only in the watched namespace: {secrets:?}"
    );
    let sandboxes = grants(&d, "sandboxes");
    assert_eq!(sandboxes.keys().collect::<Vec<_>>(), vec![&fleet]);
    let deploys = grants(&d, "sandboxdeploys");
    assert_eq!(deploys[&prod], vec!["get", "create"]);
    assert_eq!(grants(&d, "leases").keys().collect::<Vec<_>>(), vec![&ops]);

    // On the API server.
    kubectl_ok(&["apply", "-f", "-"], Some(&rendered));
    let who = format!("--as=system:serviceaccount:{ops}:{full}");
    let can = |args: &[&str]| -> bool {
        let mut a = vec!["auth", "can-i", who.as_str()];
        a.extend_from_slice(args);
        String::from_utf8_lossy(&kubectl(&a, None).stdout).trim() == "yes"
    };
    for (allowed, args) in [
        (true, vec!["watch", "secrets", "-n", fleet.as_str()]),
        (
            true,
            vec!["patch", "sandboxes.fleet.valet.dev", "-n", &fleet],
        ),
        (
            true,
            vec!["create", "sandboxdeploys.fleet.valet.dev", "-n", &prod],
        ),
        (true, vec!["create", "events.events.k8s.io", "-n", &fleet]),
        (false, vec!["get", "secrets", "-n", &prod]),
        (false, vec!["get", "secrets", "-n", &other]),
        (false, vec!["get", "secrets", "-n", &ops]),
        (false, vec!["list", "secrets", "--all-namespaces"]),
        (
            false,
            vec!["list", "sandboxes.fleet.valet.dev", "-n", &other],
        ),
        (
            false,
            vec!["list", "sandboxes.fleet.valet.dev", "--all-namespaces"],
        ),
        (
            false,
            vec!["watch", "sandboxes.fleet.valet.dev", "-n", &prod],
        ),
        (
            false,
            vec!["delete", "sandboxdeploys.fleet.valet.dev", "-n", &prod],
        ),
    ] {
        assert_eq!(can(&args), allowed, "can-i {}", args.join(" "));
    }

    // Without a watched namespace: one ClusterRole (all namespaces), as documented.
    let d = docs(&helm_template(&["--show-only", "templates/rbac.yaml"]));
    assert!(find(&d, "ClusterRole").is_some() && find(&d, "ClusterRoleBinding").is_some());
    assert!(find(&d, "Role").is_none());
}

/// The optional objects: the webhook's Ingress (its paths only), its HMAC secret mounted from a
/// Secret, the PrometheusRule with the alerts a fleet owner needs, the Grafana dashboard for the
/// sidecar; and the whole set valid for the API server (a server-side dry run).
#[tokio::test]
async fn chart_renders_ingress_webhook_secret_alerts_and_dashboard() {
    let config = r#"config={"webhook":{"environments":{"staging":{"namespace":"fleet"}}}}"#;
    let all_on = [
        "--namespace",
        "ops",
        "--set-json",
        config,
        "--set",
        "webhook.secretRef.name=ci-webhook",
        "--set",
        "webhook.secretRef.key=hmac",
        "--set",
        "ingress.enabled=true",
        "--set",
        "ingress.className=nginx",
        "--set",
        "ingress.host=ci.fleet.internal",
        "--set-json",
        r#"ingress.tls=[{"secretName":"ci-tls","hosts":["ci.fleet.internal"]}]"#,
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "dashboard.enabled=true",
        "--set",
        "dashboard.folder=Fleet",
    ];
    let d = docs(&helm_template(&all_on));

    // Ingress: the webhook's prefix to the Service's http port; nothing else exposed.
    let ing = find(&d, "Ingress").expect("an Ingress");
    assert_eq!(ing["spec"]["ingressClassName"], "nginx");
    assert_eq!(ing["spec"]["tls"][0]["secretName"], "ci-tls");
    let rule = &ing["spec"]["rules"][0];
    assert_eq!(rule["host"], "ci.fleet.internal");
    let paths = rule["http"]["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 1);
    assert_eq!(
        paths[0]["path"],
        sandbox_operator::operator::webhook::PREFIX
    );
    assert!(
        sandbox_operator::operator::webhook::PATH.starts_with(paths[0]["path"].as_str().unwrap())
    );
    assert_eq!(
        paths[0]["backend"]["service"]["name"],
        find(&d, "Service").unwrap()["metadata"]["name"]
    );

    // The HMAC secret: the Secret mounted read-only, the config pointing at the file; the
    // rendered config is one the operator accepts.
    let v = volume(&d, "webhook-secret");
    assert_eq!(v["secret"]["secretName"], "ci-webhook");
    assert_eq!(v["secret"]["items"][0]["key"], "hmac");
    let cm = all(&d, "ConfigMap")
        .into_iter()
        .find(|c| c["data"]["config.yaml"].is_string())
        .unwrap();
    let cfg: sandbox_operator::operator::webhook::OperatorConfig =
        serde_yaml::from_str(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let w = cfg.webhook.unwrap();
    let file = w.secret_file.expect("secretFile set");
    let mount = container(&d)["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "webhook-secret")
        .unwrap()
        .clone();
    assert_eq!(mount["readOnly"], true);
    assert_eq!(
        file,
        Path::new(mount["mountPath"].as_str().unwrap())
            .join(v["secret"]["items"][0]["path"].as_str().unwrap())
    );
    assert!(w.secret_ref.is_none());

    // PrometheusRule: every alert the issue asks for.
    let rule = find(&d, "PrometheusRule").expect("a PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    let alerts: BTreeSet<&str> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    for want in [
        "SandboxesUnhealthy",
        "SandboxesFailed",
        "SandboxDeployFailed",
        "SandboxDeployStuck",
        "EC2Throttled",
        "EC2CallsFailing",
        "LedgerDroppingEvents",
        "SandboxOperatorNoLeader",
    ] {
        assert!(alerts.contains(want), "{want} missing from {alerts:?}");
    }

    // The dashboard, for the sidecar.
    let dash = all(&d, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("a dashboard ConfigMap labelled grafana_dashboard: \"1\"");
    assert_eq!(dash["metadata"]["annotations"]["grafana_folder"], "Fleet");
    let json: Value =
        serde_json::from_str(dash["data"]["sandbox-operator.json"].as_str().unwrap()).unwrap();
    assert!(json["panels"].as_array().unwrap().len() >= 10);

    // Off by default.
    let d = docs(&helm_template(&[]));
    for kind in ["Ingress", "PrometheusRule"] {
        assert!(find(&d, kind).is_none(), "{kind}");
    }

    // Valid for the API server (the PrometheusRule's CRD is not installed here: left out).
    let _ = support::client().await;
    let mut server = all_on.to_vec();
    server[1] = "default";
    let rendered = helm_template(&server)
        .split("\n---\n")
        .filter(|doc| !doc.contains("kind: PrometheusRule"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    let out = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered));
    assert!(out.status.success(), "server dry run: {}", text(&out));
}

/// `helm install` with values the schema refuses fails before anything is created: no release
/// record, no object; each refusal names what is wrong. The same install with good values works
/// (so the refusals are the schema's, not a broken connection).
#[tokio::test]
async fn helm_install_refuses_bad_values_before_creating_anything() {
    let client = support::client().await;
    let ns = support::namespace(&client, "helm-bad").await;
    let kubeconfig = support::control_plane().kubeconfig_path();
    let kubeconfig = kubeconfig.to_str().unwrap();
    let chart = root("charts/sandbox-operator");
    let release = "bad";
    let base = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "install",
            release,
            chart.to_str().unwrap(),
            "--kubeconfig",
            kubeconfig,
            "--namespace",
            &ns,
            "--skip-crds",
            "--set",
            &format!("operator.watchNamespace={ns}"),
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    for (bad, says) in [
        (vec!["--set", "ledger.mode=mysql"], "ledger"),
        (vec!["--set", "ledger.mode=postgres"], "existingSecret"),
        (vec!["--set", "replicaCount=3"], "replicaCount"),
        (vec!["--set", "persistence.size=lots"], "size"),
        (
            vec!["--set", "persistence.accessModes[0]=ReadSometimes"],
            "accessModes",
        ),
        (
            vec!["--set", "operator.watchNamespace=Fleet_Prod"],
            "watchNamespace",
        ),
        (vec!["--set", "ingress.enabled=true"], "config"),
        (vec!["--set", "webhook.secretRef.name=ci-webhook"], "config"),
        (
            vec!["--set", "prometheusRule.deployStuckFor=a-while"],
            "deployStuckFor",
        ),
        (vec!["--set", "dashboard.enable=true"], "enable"),
        (
            vec![
                "--set-json",
                r#"config={"webhook":{"environments":{"staging":{}}}}"#,
            ],
            "namespace",
        ),
    ] {
        let a = base(&bad);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = helm(&a);
        let said = text(&out);
        assert!(!out.status.success(), "{bad:?} was accepted: {said}");
        assert!(
            said.contains("values don't meet the specifications of the schema"),
            "{bad:?}: {said}"
        );
        assert!(said.contains(says), "{bad:?} should name {says}: {said}");
    }
    // Nothing created: no release record (Helm keeps them as Secrets), no object of the chart.
    let out = helm(&["list", "--all", "-q", "--kubeconfig", kubeconfig, "-n", &ns]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
    let objects = kubectl_ok(
        &[
            "get",
            "secrets,configmaps,serviceaccounts,deployments,services,persistentvolumeclaims,roles,rolebindings",
            "-n",
            &ns,
            "-o",
            "name",
        ],
        None,
    );
    let objects: Vec<&str> = objects
        .lines()
        // What the cluster's own controllers put in every namespace (the controller manager of
        // the chart test's node runs on this shared control plane): not the chart's.
        .filter(|l| !l.contains("kube-root-ca.crt") && *l != "serviceaccount/default")
        .collect();
    assert!(objects.is_empty(), "created: {objects:?}");

    // The same install with good values goes through (then is removed).
    let a = base(&[]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = helm(&a);
    assert!(out.status.success(), "{}", text(&out));
    let out = helm(&["uninstall", release, "--kubeconfig", kubeconfig, "-n", &ns]);
    assert!(out.status.success(), "{}", text(&out));
}

/// The shipped sources: everything under src/ but the test environment and the bench.
fn shipped_sources() -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut stack = vec![root("src")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p
                .strip_prefix(root("src"))
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel.starts_with("testenv")
                || rel.starts_with("bin/sandbox-bench")
                || rel == "bin/sandbox-testenv.rs"
            {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if rel.ends_with(".rs") {
                files.push((rel, std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    files.sort();
    files
}

/// Every metric the operator registers, read from its registrations in src/
/// (`registry.register("name", "help", field.clone())`, all under the registry's
/// `sandbox_operator` prefix), with the name a scrape shows: counters get `_total`. The kind is
/// that of the registered field's declaration in the same file.
fn registered_metrics() -> BTreeMap<String, (String, &'static str)> {
    let mut out = BTreeMap::new();
    for (rel, text) in shipped_sources() {
        let mut rest = text.as_str();
        while let Some(at) = rest.find(".register(") {
            let after = &rest[at + ".register(".len()..];
            rest = after;
            // The call's arguments, up to its closing parenthesis.
            let (mut depth, mut end) = (1, 0);
            for (i, c) in after.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = i;
                    break;
                }
            }
            let call = &after[..end];
            let Some(name) = call
                .trim_start()
                .strip_prefix('"')
                .and_then(|s| s.split('"').next())
            else {
                continue; // not a registration of a named metric
            };
            let value = call
                .rsplit(',')
                .find(|a| !a.trim().is_empty())
                .unwrap()
                .trim();
            let field = value
                .trim_end_matches(".clone()")
                .rsplit('.')
                .next()
                .unwrap()
                .trim();
            let kind = text
                .lines()
                .map(|l| {
                    l.trim()
                        .trim_start_matches("pub(crate) ")
                        .trim_start_matches("pub ")
                        .trim_start_matches("let ")
                })
                .filter(|l| {
                    l.starts_with(&format!("{field}:")) || l.starts_with(&format!("{field} ="))
                })
                .find_map(|l| {
                    ["Histogram", "Counter", "Gauge"]
                        .into_iter()
                        .find(|k| l.contains(k))
                })
                .unwrap_or_else(|| panic!("{rel}: the kind of {name} ({field})"));
            let full = format!("sandbox_operator_{name}");
            let served = match kind {
                "Counter" => format!("{full}_total"),
                _ => full,
            };
            out.insert(served, (rel.clone(), kind));
        }
    }
    out
}

/// The metric names a Prometheus text scrape serves: counters with `_total`, gauges as they are.
fn served_metrics(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let (Some(name), Some(kind)) = (it.next(), it.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
            "info" => {
                names.insert(format!("{name}_info"));
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// The metric names in a PromQL expression: every identifier of the operator's prefix, and every
/// identifier followed by a label selector `{` (which must be a metric). Label values and names
/// in quotes or after `by`/`without` are not identifiers of the prefix.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    let mut in_quote = false;
    while i < b.len() {
        let c = b[i] as char;
        if c == '"' {
            in_quote = !in_quote;
            i += 1;
            continue;
        }
        if !in_quote && (c.is_ascii_alphabetic() || c == '_' || c == ':') {
            let start = i;
            while i < b.len()
                && ((b[i] as char).is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
            {
                i += 1;
            }
            let word = &expr[start..i];
            let selector = b.get(i) == Some(&b'{');
            if word.starts_with("sandbox_operator_") || selector {
                out.push(word.to_string());
            }
            continue;
        }
        i += 1;
    }
    out
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metrics_in(
            r#"sum by (phase) (rate(sandbox_operator_x_total{job="a",phase=~"b|c"}[5m])) / other{a="sandbox_operator_y"}"#
        ),
        vec!["sandbox_operator_x_total", "other"]
    );
    let served =
        served_metrics("# HELP a A.\n# TYPE a counter\na_total 1\n# TYPE b gauge\n# EOF\n");
    assert_eq!(served, BTreeSet::from(["a_total".into(), "b".into()]));
}

/// The alerts, the dashboard's queries and the README's metrics table against what the operator
/// really serves: a `/metrics` scrape of a running operator (controllers started, ledger on).
/// Every expression names at least one metric and only served ones; the README lists each served
/// metric once and nothing else.
#[tokio::test]
async fn alerts_dashboard_and_readme_name_only_metrics_the_operator_serves() {
    let client = support::client().await;
    let ns = support::namespace(&client, "metrics-names").await;
    let ec2 = sandbox_operator::testenv::ec2::Ec2Endpoint::start(Default::default())
        .await
        .unwrap();
    let op = support::Operator::start(&ns, &ec2.url(), &[]);
    support::eventually(60, "the controllers started", || async {
        op.logs().contains("controllers starting").then_some(())
    })
    .await;
    let scrape = op.metrics().await;
    // What a scrape shows are the metrics with samples so far (a family without any is left out
    // of the exposition); the registrations in src/ are all of them. The scrape checks the
    // reading of the sources: nothing served that the registrations do not name.
    let registered = registered_metrics();
    let served: BTreeSet<String> = registered.keys().cloned().collect();
    let scraped = served_metrics(&scrape);
    assert!(scraped.len() >= 8, "{scrape}");
    let unknown: Vec<_> = scraped.difference(&served).collect();
    assert!(
        unknown.is_empty(),
        "served but not found in the registrations: {unknown:?}\n{registered:?}"
    );
    for must in [
        "sandbox_operator_sandboxes",
        "sandbox_operator_sandboxdeploys",
        "sandbox_operator_leader",
        "sandbox_operator_reconciles_total",
        "sandbox_operator_ec2_api_calls_total",
        "sandbox_operator_ec2_client_paced_wait_seconds_total",
        "sandbox_operator_ledger_events_dropped_total",
        "sandbox_operator_secretbundle_pushes_total",
    ] {
        assert!(
            served.contains(must),
            "{must} not registered: {registered:?}"
        );
    }
    // This process runs the controllers (no leader election): the gauge says so.
    support::eventually(10, "sandbox_operator_leader 1", || async {
        op.metrics()
            .await
            .lines()
            .any(|l| l == "sandbox_operator_leader 1")
            .then_some(())
    })
    .await;

    let d = docs(&helm_template(&[
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "dashboard.enabled=true",
    ]));
    let mut exprs: Vec<(String, String)> = Vec::new();
    for g in find(&d, "PrometheusRule").unwrap()["spec"]["groups"]
        .as_array()
        .unwrap()
    {
        for r in g["rules"].as_array().unwrap() {
            exprs.push((
                format!("alert {}", r["alert"].as_str().unwrap()),
                r["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    let dash = all(&d, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["labels"]["grafana_dashboard"] == "1")
        .unwrap();
    let json: Value =
        serde_json::from_str(dash["data"]["sandbox-operator.json"].as_str().unwrap()).unwrap();
    for p in json["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push((
                format!("panel {}", p["title"].as_str().unwrap()),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    for v in json["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            exprs.push((format!("variable {}", v["name"]), q.to_string()));
        }
    }
    assert!(exprs.len() >= 20, "{exprs:?}");
    let mut used = BTreeSet::new();
    for (what, expr) in &exprs {
        let names = metrics_in(expr);
        assert!(!names.is_empty(), "{what} names no metric: {expr}");
        for n in names {
            assert!(
                served.contains(&n),
                "{what} names {n}, which the operator does not serve: {expr}\nserved: {served:?}"
            );
            used.insert(n);
        }
    }
    eprintln!(
        "{} expressions; metrics used {}/{}",
        exprs.len(),
        used.len(),
        served.len()
    );

    // The README's metrics table: every served metric, nothing else.
    let readme = read("README.md");
    let section = readme
        .split("\n## Metrics\n")
        .nth(1)
        .expect("a \"## Metrics\" section in README.md");
    let section = section.split("\n## ").next().unwrap();
    // The first cell of each row: one or more `name`s, without the prefix.
    let listed: BTreeSet<String> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(|l| {
            let cell = l.split('|').nth(1).unwrap_or("");
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(|n| format!("sandbox_operator_{n}"))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(listed.len() >= 10, "{listed:?}");
    let missing: Vec<_> = served.difference(&listed).collect();
    let extra: Vec<_> = listed.difference(&served).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "README metrics table: missing {missing:?}, not served {extra:?}"
    );
}

/// The EC2 actions the code can call: each aws-sdk-ec2 operation (the crate's `operation/`
/// modules) whose client method the shipped code calls, as an IAM action.
fn ec2_actions_called() -> BTreeMap<String, Vec<String>> {
    let lock = read("Cargo.lock");
    let version = lock
        .split("\n[[package]]\n")
        .find(|p| p.starts_with("name = \"aws-sdk-ec2\"\n"))
        .and_then(|p| p.lines().nth(1))
        .and_then(|l| l.strip_prefix("version = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("aws-sdk-ec2 in Cargo.lock")
        .to_string();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var("HOME").unwrap()).join(".cargo"));
    let mut ops: Vec<String> = Vec::new();
    for reg in std::fs::read_dir(cargo_home.join("registry/src")).unwrap() {
        let dir = reg
            .unwrap()
            .path()
            .join(format!("aws-sdk-ec2-{version}/src/operation"));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    ops.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
    }
    assert!(
        ops.len() > 500,
        "aws-sdk-ec2 {version}'s operations not found under {}",
        cargo_home.display()
    );
    let files = shipped_sources();
    // Each file's method calls without arguments (`.name()`), once.
    let calls: Vec<(String, BTreeSet<&str>)> = files
        .iter()
        .map(|(rel, text)| {
            let set = text
                .split('.')
                .skip(1)
                .filter_map(|s| s.split_once("()").map(|(name, _)| name))
                .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                .collect();
            (rel.clone(), set)
        })
        .collect();
    let mut called: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for op in &ops {
        for (rel, set) in &calls {
            if set.contains(op.as_str()) {
                let action: String = op
                    .split('_')
                    .map(|w| {
                        let mut c = w.chars();
                        c.next()
                            .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                            .unwrap_or_default()
                    })
                    .collect();
                called
                    .entry(format!("ec2:{action}"))
                    .or_default()
                    .push(rel.clone());
            }
        }
    }
    called
}

/// charts/sandbox-operator/iam-policy.json allows every EC2 action the code can call (a new call
/// without its policy line fails here), CreateTags for the tags RunInstances applies at launch,
/// and nothing that is never called; the README names the file and every action.
#[test]
fn iam_policy_allows_every_ec2_call_the_code_makes() {
    let called = ec2_actions_called();
    for must in [
        "ec2:DescribeInstances",
        "ec2:RunInstances",
        "ec2:DescribeImages",
        "ec2:DeleteTags",
        "ec2:CancelSpotInstanceRequests",
    ] {
        assert!(
            called.contains_key(must),
            "{must} not found in src/: {called:?}"
        );
    }
    let policy: Value = serde_json::from_str(&read("charts/sandbox-operator/iam-policy.json"))
        .expect("iam-policy.json is JSON");
    assert_eq!(policy["Version"], "2012-10-17");
    let mut allowed = BTreeSet::new();
    for s in policy["Statement"].as_array().unwrap() {
        assert_eq!(s["Effect"], "Allow");
        match &s["Action"] {
            Value::String(a) => {
                allowed.insert(a.clone());
            }
            Value::Array(a) => allowed.extend(a.iter().map(|x| x.as_str().unwrap().to_string())),
            other => panic!("Action {other}"),
        }
    }
    for (action, files) in &called {
        assert!(
            allowed.contains(action),
            "{action} is called ({files:?}) but not in charts/sandbox-operator/iam-policy.json"
        );
    }
    // Launch tags (tag_specifications) need CreateTags; an instance profile needs PassRole.
    let engine = read("src/ec2/convert.rs") + &read("src/ec2/engine.rs");
    assert!(engine.contains("tag_specifications"));
    let mut expected: BTreeSet<String> = called.keys().cloned().collect();
    expected.insert("ec2:CreateTags".into());
    expected.insert("iam:PassRole".into());
    assert_eq!(
        allowed, expected,
        "the policy allows exactly what is called"
    );

    let readme = read("README.md");
    assert!(readme.contains("charts/sandbox-operator/iam-policy.json"));
    for a in &expected {
        assert!(
            readme.contains(&format!("`{a}`")),
            "README does not name {a}"
        );
    }
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("running a command");
    assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// `make dist`'s script on the built agent: one tarball and its sha256 file; the tarball's own
/// SHA256SUMS hold; the binary is stripped; install.sh installs into a scratch root the binary,
/// the unit (enabled), the config directory and the token file with their modes, and a second
/// run changes nothing it should keep (idempotent). The release build itself is not made here
/// (a full release build; `make dist` does it).
#[test]
fn dist_tarball_verifies_and_installs_into_a_scratch_root() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dist");
    let tarball = sh(Command::new(root("hack/dist.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_sandbox-agent"), "--out"])
        .arg(&out));
    let tarball = Path::new(tarball.trim());
    let name = tarball.file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with(&format!(
            "sandbox-agent-{}-linux-",
            env!("CARGO_PKG_VERSION")
        )) && name.ends_with(".tar.gz"),
        "{name}"
    );
    let entries: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    sh(Command::new("sha256sum")
        .args(["-c", &format!("{name}.sha256")])
        .current_dir(&out));
    // A tampered tarball fails the check.
    let copy = tmp.path().join("tampered");
    std::fs::create_dir(&copy).unwrap();
    let mut bytes = std::fs::read(tarball).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(copy.join(name), bytes).unwrap();
    std::fs::copy(
        out.join(format!("{name}.sha256")),
        copy.join(format!("{name}.sha256")),
    )
    .unwrap();
    let bad = Command::new("sha256sum")
        .args(["-c", &format!("{name}.sha256")])
        .current_dir(&copy)
        .output()
        .unwrap();
    assert!(!bad.status.success());

    let unpack = tmp.path().join("unpack");
    std::fs::create_dir(&unpack).unwrap();
    sh(Command::new("tar")
        .arg("-xzf")
        .arg(tarball)
        .arg("-C")
        .arg(&unpack));
    let dir = unpack.join(name.trim_end_matches(".tar.gz"));
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "SHA256SUMS",
            "agent.yaml",
            "install.sh",
            "sandbox-agent",
            "sandbox-agent.service"
        ]
    );
    sh(Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&dir));
    let nm = Command::new("nm")
        .arg(dir.join("sandbox-agent"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&nm.stderr).contains("no symbols"),
        "not stripped: {}",
        text(&nm)
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("sandbox-agent.service")).unwrap(),
        read("examples/agent/sandbox-agent.service")
    );
    sh(Command::new(dir.join("sandbox-agent")).arg("--help"));

    // Installed into a scratch root, as the README says, with a token from the environment.
    let r = tmp.path().join("root");
    std::fs::create_dir(&r).unwrap();
    let token = "0123456789abcdef-dist-test-token";
    let install = |r: &Path| {
        let out = Command::new(dir.join("install.sh"))
            .arg("--root")
            .arg(r)
            .env("SANDBOX_AGENT_TOKEN", token)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "install.sh: {}", text(&out));
        assert!(!text(&out).contains(token), "the token was printed");
        text(&out)
    };
    install(&r);
    for (path, want) in [
        ("usr/local/bin/sandbox-agent", 0o755),
        ("etc/systemd/system/sandbox-agent.service", 0o644),
        ("etc/sandbox-agent", 0o750),
        ("etc/sandbox-agent/agent.yaml", 0o640),
        ("etc/sandbox-agent/token", 0o600),
        ("var/lib/sandbox-agent", 0o700),
    ] {
        assert_eq!(
            mode(&r.join(path)),
            want,
            "{path}: {:o}",
            mode(&r.join(path))
        );
    }
    assert_eq!(
        std::fs::read_to_string(r.join("etc/sandbox-agent/token")).unwrap(),
        format!("{token}\n")
    );
    let wants = r.join("etc/systemd/system/multi-user.target.wants/sandbox-agent.service");
    assert_eq!(
        std::fs::read_link(&wants).unwrap(),
        Path::new("/etc/systemd/system/sandbox-agent.service")
    );
    let unit = std::fs::read_to_string(r.join("etc/systemd/system/sandbox-agent.service")).unwrap();
    assert!(
        unit.contains(
            "ExecStart=/usr/local/bin/sandbox-agent --config /etc/sandbox-agent/agent.yaml"
        )
    );
    assert!(unit.contains("WantedBy=multi-user.target"));
    assert_eq!(
        std::fs::read(r.join("usr/local/bin/sandbox-agent")).unwrap(),
        std::fs::read(dir.join("sandbox-agent")).unwrap()
    );

    // Again: the operator's edited config is kept (the new one beside it), all else in place.
    std::fs::write(
        r.join("etc/sandbox-agent/agent.yaml"),
        "listen: 0.0.0.0:8001\n",
    )
    .unwrap();
    let said = install(&r);
    assert!(said.contains("keeping"), "{said}");
    assert_eq!(
        std::fs::read_to_string(r.join("etc/sandbox-agent/agent.yaml")).unwrap(),
        "listen: 0.0.0.0:8001\n"
    );
    assert!(r.join("etc/sandbox-agent/agent.yaml.example").exists());
    assert_eq!(mode(&r.join("etc/sandbox-agent/token")), 0o600);
    assert!(std::fs::read_link(&wants).is_ok());
}

/// Bad input, an operator without a permission it needs: the chart's namespaced RBAC with
/// `list`/`watch` on Secrets taken away. The operator says which call was refused and for whom
/// (verb, resource, namespace, ServiceAccount) in its log and in a Warning Event on its Pod, and
/// keeps running: it serves /healthz, the Sandbox controller makes a Sandbox Ready, and once the
/// permission is granted the SecretBundle controller (whose Secret watch was refused) works
/// without a restart.
#[tokio::test]
async fn an_operator_refused_a_permission_says_which_and_keeps_running() {
    use crate::fleet::Agent;
    use crate::ship::{SaOperator, launched_example, service_account_kubeconfig};
    use sandbox_operator::api::{Sandbox, SecretBundle};
    use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions};

    let client = support::client().await;
    let ns = support::namespace(&client, "refused").await;
    let full = format!("refused-{}", &ns[ns.len().saturating_sub(8)..]);
    let rbac = helm_template(&[
        "--namespace",
        &ns,
        "--set",
        &format!("fullnameOverride={full}"),
        "--set",
        &format!("operator.watchNamespace={ns}"),
        "--show-only",
        "templates/serviceaccount.yaml",
        "--show-only",
        "templates/rbac.yaml",
    ]);
    // The same objects with Secrets readable one by one only (no list, no watch).
    let narrowed: Vec<Value> = docs(&rbac)
        .into_iter()
        .map(|mut d| {
            if d["kind"] == "Role" {
                for rule in d["rules"].as_array_mut().unwrap() {
                    if rule["resources"] == serde_json::json!(["secrets"]) {
                        rule["verbs"] = serde_json::json!(["get"]);
                    }
                }
            }
            d
        })
        .collect();
    let narrowed = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": narrowed});
    kubectl_ok(&["apply", "-f", "-"], Some(&narrowed.to_string()));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(&ns, &full, dir.path());
    let ec2 = Ec2Endpoint::start(
        Ec2EndpointOptions::default().with_transitions(std::time::Duration::from_secs(1)),
    )
    .await
    .unwrap();
    let agent = Agent::start("v1", 0).await;
    let pod = "sandbox-operator-7d9f-refused";
    let mut op = SaOperator::start_with_env(
        &kubeconfig,
        &ns,
        &ec2.url(),
        dir.path(),
        &[],
        &[("POD_NAME", pod), ("POD_NAMESPACE", &ns)],
    );
    let user = format!("system:serviceaccount:{ns}:{full}");

    // The log: the API server's refusal, taken apart, with the check to run.
    let said = support::eventually(60, "the refusal in the log", || async {
        op.logs()
            .lines()
            .find(|l| l.contains("the API server refused a request"))
            .map(str::to_string)
    })
    .await;
    for want in [
        format!("User \"{user}\" cannot list resource \"secrets\""),
        format!("in the namespace \"{ns}\""),
        format!("kubectl auth can-i list secrets -n {ns} --as={user}"),
        "secretbundle".to_string(),
        "keeps running".to_string(),
    ] {
        assert!(said.contains(&want), "{want} missing from: {said}");
    }

    // The Event, on the operator's Pod.
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(client.clone(), &ns);
    let ev = support::eventually(30, "a Forbidden Event on the operator's Pod", || async {
        events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("Forbidden"))
    })
    .await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    let regarding = ev.regarding.clone().unwrap();
    assert_eq!(regarding.kind.as_deref(), Some("Pod"));
    assert_eq!(regarding.name.as_deref(), Some(pod));
    let note = ev.note.clone().unwrap_or_default();
    assert!(
        note.contains(&format!("User \"{user}\" cannot list resource \"secrets\"")),
        "{note}"
    );

    // It keeps running: alive, serving, and the Sandbox controller does its work.
    assert!(op.running(), "the operator exited:\n{}", op.logs());
    let health = reqwest::get(format!("http://{}/healthz", op.http))
        .await
        .unwrap();
    assert!(health.status().is_success());
    let manifest = launched_example(&ec2, &agent).await;
    kubectl_ok(
        &["apply", "--server-side", "-n", &ns, "-f", "-"],
        Some(&manifest),
    );
    let sbx: kube::Api<Sandbox> = kube::Api::namespaced(client.clone(), &ns);
    support::eventually(90, "worker-1 Ready despite the refusal", || async {
        let s = sbx.get("worker-1").await.ok()?.status?;
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await;
    assert!(op.running());
    // Reported once, not at every retry of the watch.
    let times = op
        .logs()
        .matches("the API server refused a request")
        .count();
    assert_eq!(times, 1, "{}", op.logs());

    // Granted: the refused watch succeeds on its next retry; a SecretBundle becomes Ready.
    kubectl_ok(&["apply", "-f", "-"], Some(&rbac));
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
    let bundles: kube::Api<SecretBundle> = kube::Api::namespaced(client.clone(), &ns);
    support::eventually(60, "the SecretBundle Ready once granted", || async {
        let s = bundles.get("worker-env").await.ok()?.status?;
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await;
    assert!(op.running());
}

/// What the README's shell blocks need, and so whether this test runs them.
enum Block {
    /// Run against `make demo` (hack/demo.sh, with the test's binaries).
    Tour,
    /// Not run here, and why.
    NotRun(&'static str),
}

/// Every `sh` block of the README, by its first line: run (the tour, against `make demo` as the
/// README says) or named with the reason it cannot run here. A new block fails this test until it
/// is classified, so no block is skipped silently.
#[test]
fn readme_shell_blocks_run_or_say_why_not() {
    let classified: &[(&str, Block)] = &[
        (
            "make demo   #",
            Block::NotRun(
                "`make demo` is what the tour below runs (hack/demo.sh); `make test` is this test suite",
            ),
        ),
        (
            "sandbox-operator report cost",
            Block::NotRun(
                "names a ledger file and a PostgreSQL server of the reader's; the tour runs `sandbox-operator report fleet` on the demo's ledger, and tests/integration/ledger.rs the reports",
            ),
        ),
        (
            "kubectl create namespace sandbox-operator",
            Block::NotRun(
                "needs a cluster with a node, the operator image and a PostgreSQL server; here the chart is rendered, applied as a server-side dry run and `helm install`ed against the API server, which has no node",
            ),
        ),
        (
            "kubectl annotate sbx worker-1",
            Block::NotRun(
                "acts on a running sandbox of the reader's; tests/integration/sandbox.rs runs each day-2 action by annotation and `kubectl sandbox terminate --force` through the real plugin",
            ),
        ),
        (
            "kubectl scale -n fleet sbxpool workers",
            Block::NotRun(
                "scales a pool of the reader's; tests/integration/pool.rs runs `kubectl scale` on a SandboxPool (0 to 5 to 2 and back) and reads its printer columns",
            ),
        ),
        (
            "kubectl -n sandbox-operator create secret generic notify-slack",
            Block::NotRun(
                "needs a Slack workspace's incoming webhook URL; tests/integration/notify.rs sends to a local receiver, its URLs read from Secrets made the same way",
            ),
        ),
        (
            "aws iam create-policy",
            Block::NotRun("needs an AWS account; the policy file itself is checked against src/"),
        ),
        ("# tour:", Block::Tour),
        (
            "# From the old admin database",
            Block::NotRun(
                "needs the old admin database or an AWS account; tests/integration/import.rs runs the import against PostgreSQL and the EC2 endpoint",
            ),
        ),
        (
            "make dist",
            Block::NotRun(
                "a full release build; the dist test packs the debug build with the same hack/dist.sh",
            ),
        ),
        (
            "scp target/dist/",
            Block::NotRun(
                "needs an instance reachable by ssh; the dist test runs the same sha256 checks and install.sh (with --root)",
            ),
        ),
    ];
    let readme = read("README.md");
    let mut blocks: Vec<String> = Vec::new();
    let mut lines = readme.lines();
    while let Some(l) = lines.next() {
        if l.trim_end() == "```sh" {
            let mut body = String::new();
            for l in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            blocks.push(body);
        }
    }
    let mut tours = Vec::new();
    for b in &blocks {
        let first = b.lines().next().unwrap_or("");
        let Some((_, how)) = classified.iter().find(|(p, _)| first.starts_with(p)) else {
            panic!("README block starting {first:?} is neither run nor explained: add it here");
        };
        match how {
            Block::Tour => tours.push(b.clone()),
            Block::NotRun(why) => eprintln!("not run: {first:?}: {why}"),
        }
    }
    assert_eq!(blocks.len(), classified.len(), "a classified block is gone");
    assert_eq!(tours.len(), 1);

    // The tarball names in the README are the ones make dist writes.
    let arch = std::env::consts::ARCH;
    assert!(
        readme.contains(&format!(
            "sandbox-agent-{}-linux-{arch}.tar.gz",
            env!("CARGO_PKG_VERSION")
        )),
        "README's tarball name"
    );

    // The tour, as written, after make demo (the binaries this test was built with).
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("tour.sh");
    std::fs::write(&script, &tours[0]).unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_sandbox-operator"))
        .parent()
        .unwrap()
        .to_path_buf();
    let out = Command::new(root("hack/demo.sh"))
        .env("DEMO_BIN", &bin)
        .env("DEMO_THEN", &script)
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "the tour failed:\n{said}");
    for want in [
        "CONVERGED_SECONDS=",
        "condition met",
        "sandbox_operator_sandboxes{phase=\"Active\"}",
        "worker-1",
    ] {
        assert!(
            said.contains(want),
            "{want} missing from the tour's output:\n{said}"
        );
    }
}
