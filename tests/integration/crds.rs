//! The CRDs: committed files match the code, they install into a real API server, valid
//! manifests apply, every CEL rule refuses what it should with its message, and a Sandbox
//! round-trips through kube-rs with its status subresource.

use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use sandbox_operator::api::{self, Sandbox, SandboxPhase, SandboxSpec, SandboxStatus};

use crate::support::{self, kubectl, text};

#[test]
fn committed_crds_match_the_code() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut expected_files = Vec::new();
    for crd in api::crds() {
        let name = api::crd_file_name(&crd);
        let want = serde_yaml::to_string(&crd).unwrap();
        let have = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        assert!(
            have == want,
            "crds/{name} differs from what the code generates: run `make crds` and commit the result"
        );
        expected_files.push(name);
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present, expected_files,
        "crds/ holds files the code does not generate: run `make crds`"
    );
}

#[tokio::test]
async fn crds_install_as_structural_schemas() {
    let client = support::client().await;
    let api: Api<CustomResourceDefinition> = Api::all(client);
    for crd in api::crds() {
        let name = crd.metadata.name.unwrap();
        let live = api.get(&name).await.unwrap();
        let conds = live.status.and_then(|s| s.conditions).unwrap_or_default();
        let get = |t: &str| {
            conds
                .iter()
                .find(|c| c.type_ == t)
                .map(|c| c.status.clone())
        };
        assert_eq!(
            get("Established").as_deref(),
            Some("True"),
            "{name} not Established: {conds:?}"
        );
        assert_eq!(
            get("NonStructuralSchema"),
            None,
            "{name} has a non-structural schema: {conds:?}"
        );
        let names = live.spec.names;
        assert_eq!(names.categories, Some(vec!["fleet".to_string()]));
        assert!(
            names.short_names.is_some_and(|s| !s.is_empty()),
            "{name} has no short name"
        );
    }
}

const VALID_LAUNCH: &str = r#"
apiVersion: fleet.valet.dev/v1alpha1
kind: Sandbox
metadata: {name: launched}
spec:
  environment: staging
  instanceType: t3.large
  browserEngine: adspower
  capacity: 2
  launch:
    imageId: ami-0123456789abcdef0
    subnetId: subnet-0123456789abcdef0
    securityGroupIds: [sg-0123456789abcdef0]
    keyName: fleet
    rootVolumeSizeGib: 50
    market: Spot
    userDataSecretRef: {name: user-data, key: cloud-init}
    tags: {team: automation}
  powerState: Running
  autoStop: {idleAfter: 45m}
  image: {repository: registry.example/worker, tag: v1.2.3}
  agent:
    port: 8000
    tokenSecretRef: {name: agent-token, key: token}
    probeInterval: 15s
    timeout: 3s
    failureThreshold: 4
"#;

const VALID_ADOPT: &str = r#"
apiVersion: fleet.valet.dev/v1alpha1
kind: Sandbox
metadata: {name: adopted}
spec:
  environment: prod
  instanceId: i-0123456789abcdef0
  managementPolicy: ObserveOnly
  agent: {url: "http://10.0.0.5:8000"}
"#;

const VALID_DEPLOY: &str = r#"
apiVersion: fleet.valet.dev/v1alpha1
kind: SandboxDeploy
metadata: {name: staging-abc123}
spec:
  image: {repository: registry.example/worker, tag: abc123}
  selector:
    environment: staging
    matchLabels: {fleet: workers}
  strategy: {maxUnavailable: 25%, drainTimeout: 2m, targetDeadline: 10m, failurePolicy: Continue, autoRollback: true}
  paused: true
  source: {commitSha: abc123, commitMessage: "fix: things", repository: org/repo, runUrl: "https://ci.example/run/1"}
"#;

const VALID_BUNDLE: &str = r#"
apiVersion: fleet.valet.dev/v1alpha1
kind: SecretBundle
metadata: {name: worker-env}
spec:
  sources:
  - secretName: worker-secrets
  - secretName: shared
    keys: [DATABASE_URL, REDIS_URL]
  targets:
    sandboxes:
      selector: {environment: staging}
      restartServices: [worker]
    flyApps:
    - app: valet-api
      tokenSecretRef: {name: fly, key: token}
      stage: true
  refreshInterval: 30m
  maxParallel: 5
"#;

fn apply(ns: &str, manifest: &str) -> std::process::Output {
    kubectl(
        &[
            "apply",
            "--server-side",
            "--field-manager=test",
            "-n",
            ns,
            "-f",
            "-",
        ],
        Some(manifest),
    )
}

#[tokio::test]
async fn valid_manifests_apply_server_side_and_print() {
    let client = support::client().await;
    let ns = support::namespace(&client, "valid-manifests").await;
    for m in [VALID_LAUNCH, VALID_ADOPT, VALID_DEPLOY, VALID_BUNDLE] {
        let out = apply(&ns, m);
        assert!(
            out.status.success(),
            "valid manifest refused:\n{m}\n{}",
            text(&out)
        );
    }
    // Defaults are filled in by the API server.
    let sbx: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let adopted = sbx.get("adopted").await.unwrap();
    assert_eq!(adopted.spec.agent.port, 8000);
    assert_eq!(adopted.spec.agent.probe_interval, "30s");
    assert_eq!(adopted.spec.capacity, 1);
    // Short names, the category and printer columns.
    let out = kubectl(&["get", "fleet", "-n", &ns], None);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for want in [
        "sandbox.fleet.valet.dev/launched",
        "sandboxdeploy.fleet.valet.dev/staging-abc123",
        "secretbundle.fleet.valet.dev/worker-env",
    ] {
        assert!(t.contains(want), "`kubectl get fleet` lacks {want}:\n{t}");
    }
    let out = kubectl(&["get", "sbx", "-n", &ns], None);
    let header = text(&out).lines().next().unwrap_or_default().to_string();
    for col in ["PHASE", "ENV", "INSTANCE", "EC2", "HEALTH", "IMAGE", "AGE"] {
        assert!(
            header.contains(col),
            "sandbox printer columns lack {col}: {header}"
        );
    }
    let out = kubectl(&["get", "sbxdeploy", "-n", &ns], None);
    let header = text(&out).lines().next().unwrap_or_default().to_string();
    for col in ["IMAGE", "PHASE", "UPDATED", "TOTAL", "AGE"] {
        assert!(
            header.contains(col),
            "deploy printer columns lack {col}: {header}"
        );
    }
    let out = kubectl(&["get", "secbundle", "-n", &ns], None);
    assert!(out.status.success(), "{}", text(&out));
    // The field selector on environment works.
    let out = kubectl(
        &[
            "get",
            "sbx",
            "-n",
            &ns,
            "--field-selector",
            "spec.environment=prod",
            "-o",
            "name",
        ],
        None,
    );
    assert_eq!(text(&out).trim(), "sandbox.fleet.valet.dev/adopted");
}

/// Each manifest breaks one rule; the API server must refuse it with the rule's message.
const INVALID: &[(&str, &str, &str)] = &[
    (
        "neither launch nor instanceId",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev}",
        "exactly one of spec.launch",
    ),
    (
        "both launch and instanceId",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceType: t3.large, instanceId: i-0123456789abcdef0, launch: {imageId: ami-0123456789abcdef0}}",
        "exactly one of spec.launch",
    ),
    (
        "malformed instance id",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceId: i-XYZ}",
        "instanceId must look like i-",
    ),
    (
        "launch without instance type",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, launch: {imageId: ami-0123456789abcdef0}}",
        "spec.instanceType is required with spec.launch",
    ),
    (
        "observe-only launch",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceType: t3.large, managementPolicy: ObserveOnly, launch: {imageId: ami-0123456789abcdef0}}",
        "managementPolicy ObserveOnly never launches",
    ),
    (
        "observe-only terminate",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceId: i-0123456789abcdef0, managementPolicy: ObserveOnly, deletionPolicy: Terminate}",
        "deletionPolicy must be Retain",
    ),
    (
        "observe-only stopped",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceId: i-0123456789abcdef0, managementPolicy: ObserveOnly, powerState: Stopped}",
        "never starts or stops the instance",
    ),
    (
        "idleAfter not a duration",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceId: i-0123456789abcdef0, autoStop: {idleAfter: soon}}",
        "idleAfter must be a duration of at least 1m",
    ),
    (
        "idleAfter too short",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceId: i-0123456789abcdef0, autoStop: {idleAfter: 10s}}",
        "idleAfter must be a duration of at least 1m",
    ),
    (
        "probe interval not a duration",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceId: i-0123456789abcdef0, agent: {probeInterval: '5'}}",
        "agent.probeInterval must be a duration",
    ),
    (
        "timeout longer than interval",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceId: i-0123456789abcdef0, agent: {probeInterval: 5s, timeout: 10s}}",
        "agent.timeout must not be longer than agent.probeInterval",
    ),
    (
        "url and template",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceId: i-0123456789abcdef0, agent: {url: 'http://a:1', urlTemplate: 'http://{privateIp}:{port}'}}",
        "set at most one of agent.url and agent.urlTemplate",
    ),
    (
        "agent url scheme",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceId: i-0123456789abcdef0, agent: {url: 'ftp://a:1'}}",
        "agent.url must start with http",
    ),
    (
        "reserved tag",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceType: t3.large, launch: {imageId: ami-0123456789abcdef0, tags: {'aws:x': v}}}",
        "must not start with aws:",
    ),
    (
        "unknown environment",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: qa, instanceId: i-0123456789abcdef0}",
        "Unsupported value: \"qa\"",
    ),
    (
        "empty tag",
        "kind: SandboxDeploy\nmetadata: {name: x}\nspec: {image: {tag: ''}}",
        "image.tag must be a non-empty docker tag",
    ),
    (
        "maxUnavailable zero",
        "kind: SandboxDeploy\nmetadata: {name: x}\nspec: {image: {tag: v1}, strategy: {maxUnavailable: 0}}",
        "maxUnavailable must be a count of at least 1",
    ),
    (
        "maxUnavailable bad percent",
        "kind: SandboxDeploy\nmetadata: {name: x}\nspec: {image: {tag: v1}, strategy: {maxUnavailable: 0%}}",
        "maxUnavailable must be a count of at least 1",
    ),
    (
        "drain timeout not a duration",
        "kind: SandboxDeploy\nmetadata: {name: x}\nspec: {image: {tag: v1}, strategy: {drainTimeout: forever}}",
        "drainTimeout must be a duration",
    ),
    (
        "bundle without targets",
        "kind: SecretBundle\nmetadata: {name: x}\nspec: {sources: [{secretName: s}], targets: {}}",
        "spec.targets needs sandboxes, flyApps or both",
    ),
    (
        "bundle bad key name",
        "kind: SecretBundle\nmetadata: {name: x}\nspec: {sources: [{secretName: s, keys: [1BAD]}], targets: {sandboxes: {}}}",
        "keys must be environment variable names",
    ),
    (
        "bundle bad fly app",
        "kind: SecretBundle\nmetadata: {name: x}\nspec: {sources: [{secretName: s}], targets: {flyApps: [{app: Bad_App, tokenSecretRef: {name: f, key: t}}]}}",
        "app must be a Fly.io app name",
    ),
    (
        "bundle refresh interval",
        "kind: SecretBundle\nmetadata: {name: x}\nspec: {sources: [{secretName: s}], targets: {sandboxes: {}}, refreshInterval: 1s}",
        "refreshInterval must be a duration of at least 10s",
    ),
];

#[tokio::test]
async fn invalid_manifests_are_refused_with_the_rules_message() {
    let client = support::client().await;
    let ns = support::namespace(&client, "invalid-manifests").await;
    let mut failures = Vec::new();
    for (what, body, message) in INVALID {
        let manifest = format!("apiVersion: fleet.valet.dev/v1alpha1\n{body}\n");
        let out = apply(&ns, &manifest);
        let t = text(&out);
        if out.status.success() || !t.contains(message) {
            failures.push(format!(
                "{what}: expected refusal containing {message:?}, got (success={}):\n{t}",
                out.status.success()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn immutable_fields_refuse_changes() {
    let client = support::client().await;
    let ns = support::namespace(&client, "immutable").await;
    assert!(apply(&ns, VALID_ADOPT).status.success());
    let changed = VALID_ADOPT.replace("i-0123456789abcdef0", "i-0123456789abcdef1");
    let out = apply(&ns, &changed);
    assert!(
        !out.status.success()
            && text(&out).contains("spec.instanceId cannot be added, removed or changed"),
        "{}",
        text(&out)
    );

    assert!(apply(&ns, VALID_LAUNCH).status.success());
    let changed = VALID_LAUNCH.replace("rootVolumeSizeGib: 50", "rootVolumeSizeGib: 60");
    let out = apply(&ns, &changed);
    assert!(
        !out.status.success() && text(&out).contains("spec.launch is immutable"),
        "{}",
        text(&out)
    );
    // Other fields stay editable.
    let changed = VALID_LAUNCH.replace("powerState: Running", "powerState: Stopped");
    let out = apply(&ns, &changed);
    assert!(out.status.success(), "{}", text(&out));

    assert!(apply(&ns, VALID_DEPLOY).status.success());
    let out = apply(&ns, &VALID_DEPLOY.replace("tag: abc123", "tag: def456"));
    assert!(
        !out.status.success() && text(&out).contains("spec.image is immutable"),
        "{}",
        text(&out)
    );
    let out = apply(&ns, &VALID_DEPLOY.replace("paused: true", "paused: false"));
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test]
async fn sandbox_round_trips_and_status_patches_through_the_subresource() {
    let client = support::client().await;
    let ns = support::namespace(&client, "round-trip").await;
    let api: Api<Sandbox> = Api::namespaced(client, &ns);
    let spec: SandboxSpec = serde_yaml::from_value(
        serde_yaml::from_str::<serde_yaml::Value>(VALID_LAUNCH).unwrap()["spec"].clone(),
    )
    .unwrap();
    let created = api
        .create(&PostParams::default(), &Sandbox::new("rt", spec.clone()))
        .await
        .unwrap();
    assert_eq!(
        created.spec, spec,
        "the spec changed on the way through the API server"
    );
    let fetched = api.get("rt").await.unwrap();
    assert_eq!(fetched.spec, spec);

    // A status written through the main resource is ignored ...
    let mut with_status = fetched.clone();
    with_status.status = Some(SandboxStatus {
        phase: Some(SandboxPhase::Active),
        ..Default::default()
    });
    let replaced = api
        .replace("rt", &PostParams::default(), &with_status)
        .await
        .unwrap();
    assert_eq!(
        replaced.status, None,
        "status must only change through the status subresource"
    );

    // ... and one patched through the subresource sticks.
    let status = SandboxStatus {
        observed_generation: fetched.metadata.generation,
        phase: Some(SandboxPhase::Provisioning),
        stop_reason: Some(sandbox_operator::api::StopReason::Requested),
        ..Default::default()
    };
    let patch = serde_json::json!({"apiVersion": "fleet.valet.dev/v1alpha1", "kind": "Sandbox", "status": status});
    api.patch_status(
        "rt",
        &PatchParams::apply("test").force(),
        &Patch::Apply(&patch),
    )
    .await
    .unwrap();
    let after = api.get("rt").await.unwrap();
    assert_eq!(after.status, Some(status));
    assert_eq!(after.spec, spec, "a status patch must not touch the spec");
    assert_eq!(
        after.metadata.generation, fetched.metadata.generation,
        "a status patch must not bump the generation"
    );
}

/// Selectors, service and app names and agent URL templates: each manifest makes one mistake a
/// user makes; the API server must refuse it with a message that names the mistake.
const INVALID_NAMES: &[(&str, &str, &[&str])] = &[
    (
        "deploy selector operator misspelt",
        "kind: SandboxDeploy\nmetadata: {name: x}\nspec: {image: {tag: v1}, selector: {matchExpressions: [{key: tier, operator: Inn, values: [gold]}]}}",
        &[
            "spec.selector.matchExpressions[0].operator",
            "Unsupported value: \"Inn\"",
            "\"In\", \"NotIn\", \"Exists\", \"DoesNotExist\"",
        ],
    ),
    (
        "bundle sandbox selector operator in lower case",
        "kind: SecretBundle\nmetadata: {name: x}\nspec: {sources: [{secretName: s}], targets: {sandboxes: {selector: {matchExpressions: [{key: tier, operator: exists}]}}}}",
        &[
            "spec.targets.sandboxes.selector.matchExpressions[0].operator",
            "Unsupported value: \"exists\"",
        ],
    ),
    (
        "In without values",
        "kind: SandboxDeploy\nmetadata: {name: x}\nspec: {image: {tag: v1}, selector: {matchExpressions: [{key: tier, operator: In}]}}",
        &["matchExpressions with key tier: operator In needs at least one value in values"],
    ),
    (
        "Exists with values",
        "kind: SandboxDeploy\nmetadata: {name: x}\nspec: {image: {tag: v1}, selector: {matchExpressions: [{key: tier, operator: Exists, values: [a]}]}}",
        &["matchExpressions with key tier: operator Exists takes no values: remove values"],
    ),
    (
        "expression key not a label key",
        "kind: SandboxDeploy\nmetadata: {name: x}\nspec: {image: {tag: v1}, selector: {matchExpressions: [{key: 'tier name', operator: Exists}]}}",
        &["matchExpressions key tier name is not a label key"],
    ),
    (
        "expression value not a label value",
        "kind: SandboxDeploy\nmetadata: {name: x}\nspec: {image: {tag: v1}, selector: {matchExpressions: [{key: tier, operator: In, values: [gold, '-silver']}]}}",
        &["matchExpressions value -silver is not a label value"],
    ),
    (
        "matchLabels key not a label key",
        "kind: SandboxDeploy\nmetadata: {name: x}\nspec: {image: {tag: v1}, selector: {matchLabels: {'Example.com/tier': gold}}}",
        &["matchLabels key Example.com/tier is not a label key"],
    ),
    (
        "bundle matchLabels value not a label value",
        "kind: SecretBundle\nmetadata: {name: x}\nspec: {sources: [{secretName: s}], targets: {sandboxes: {selector: {matchLabels: {tier: 'gold!'}}}}}",
        &["matchLabels value of tier is not a label value"],
    ),
    (
        "restart service not a service name",
        "kind: SecretBundle\nmetadata: {name: x}\nspec: {sources: [{secretName: s}], targets: {sandboxes: {restartServices: [worker, 'ads power']}}}",
        &["restartServices entry ads power is not a service name"],
    ),
    (
        "restart service listed twice",
        "kind: SecretBundle\nmetadata: {name: x}\nspec: {sources: [{secretName: s}], targets: {sandboxes: {restartServices: [worker, worker]}}}",
        &["restartServices lists worker more than once"],
    ),
    (
        "fly app ending in a dash",
        "kind: SecretBundle\nmetadata: {name: x}\nspec: {sources: [{secretName: s}], targets: {flyApps: [{app: valet-api-, tokenSecretRef: {name: f, key: t}}]}}",
        &["app must be a Fly.io app name", "(got valet-api-)"],
    ),
    (
        "fly app listed twice",
        "kind: SecretBundle\nmetadata: {name: x}\nspec: {sources: [{secretName: s}], targets: {flyApps: [{app: valet-api, tokenSecretRef: {name: f, key: t}}, {app: valet-api, tokenSecretRef: {name: g, key: t}}]}}",
        &["flyApps lists an app more than once"],
    ),
    (
        "url template with an unknown placeholder",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceId: i-0123456789abcdef0, agent: {urlTemplate: 'http://{privateIP}:{port}'}}",
        &["agent.urlTemplate has unknown placeholder {privateIP}: use {privateIp}, {publicIp}"],
    ),
    (
        "url template with an unmatched brace",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceId: i-0123456789abcdef0, agent: {urlTemplate: 'http://{privateIp:{port}'}}",
        &["agent.urlTemplate has an unmatched { or }"],
    ),
    (
        "url template that makes no URL",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceId: i-0123456789abcdef0, agent: {urlTemplate: 'http://{privateIp} :{port}'}}",
        &["agent.urlTemplate must make a URL with a host and no spaces"],
    ),
    (
        "agent url without a host",
        "kind: Sandbox\nmetadata: {name: x}\nspec: {environment: dev, instanceId: i-0123456789abcdef0, agent: {url: 'http://'}}",
        &["agent.url must be a URL with a host"],
    ),
];

#[tokio::test]
async fn selectors_names_and_url_templates_are_refused_with_what_to_fix() {
    let client = support::client().await;
    let ns = support::namespace(&client, "invalid-names").await;
    let mut failures = Vec::new();
    for (what, body, messages) in INVALID_NAMES {
        let manifest = format!("apiVersion: fleet.valet.dev/v1alpha1\n{body}\n");
        let out = apply(&ns, &manifest);
        let t = text(&out);
        let missing: Vec<&&str> = messages.iter().filter(|m| !t.contains(**m)).collect();
        if out.status.success() || !missing.is_empty() {
            failures.push(format!(
                "{what}: expected a refusal containing {missing:?}, got (success={}):\n{t}",
                out.status.success()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn every_selector_operator_label_key_and_placeholder_is_accepted() {
    let client = support::client().await;
    let ns = support::namespace(&client, "valid-names").await;
    let manifests = [
        r#"
apiVersion: fleet.valet.dev/v1alpha1
kind: SandboxDeploy
metadata: {name: every-operator}
spec:
  image: {tag: v1}
  selector:
    matchLabels: {fleet.valet.dev/pool: workers-1, tier: ""}
    matchExpressions:
    - {key: app.kubernetes.io/name, operator: In, values: [worker, w_2.x]}
    - {key: tier, operator: NotIn, values: [bronze]}
    - {key: zone, operator: Exists}
    - {key: canary, operator: DoesNotExist, values: []}
"#,
        r#"
apiVersion: fleet.valet.dev/v1alpha1
kind: SecretBundle
metadata: {name: names}
spec:
  sources: [{secretName: s}]
  targets:
    sandboxes:
      selector: {matchExpressions: [{key: tier, operator: Exists}]}
      restartServices: [worker, valet-worker.service, getty@tty1, compose_web]
    flyApps:
    - {app: valet-api, tokenSecretRef: {name: fly, key: token}}
    - {app: a1, tokenSecretRef: {name: fly, key: token}}
"#,
        r#"
apiVersion: fleet.valet.dev/v1alpha1
kind: Sandbox
metadata: {name: every-placeholder}
spec:
  environment: dev
  instanceId: i-0123456789abcdef0
  agent: {urlTemplate: "https://{publicDns}:{port}/agents/{instanceId}?ip={privateIp}&pub={publicIp}&dns={privateDns}"}
"#,
    ];
    for m in manifests {
        let out = apply(&ns, m);
        assert!(
            out.status.success(),
            "valid manifest refused:\n{m}\n{}",
            text(&out)
        );
    }
}
