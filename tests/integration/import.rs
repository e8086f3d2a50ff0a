//! `sandbox-operator import` through the real binary: the seeds' `sandboxes` table in a real
//! PostgreSQL server (schema and rows from `tests/fixtures/`), EC2 instances selected by tag on
//! the wrapped moto endpoint, and the shared control plane, which checks the manifests
//! (server-side apply, dry run and for real) and holds the Sandboxes that must not be duplicated.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{InstanceType, ResourceType, Tag, TagSpecification};
use kube::api::{Api, ListParams, Patch, PatchParams};
use sandbox_operator::api::{BrowserEngine, Environment, PowerState, Sandbox};
use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions};
use sandbox_operator::testenv::postgres::PostgresServer;
use sqlx::Connection;

use crate::support::{self, Operator, control_plane, kubectl, text};

const SCHEMA: &str = include_str!("../fixtures/seeds_sandboxes_schema.sql");
const DRIFT: &str = include_str!("../fixtures/seeds_sandboxes_enum_drift.sql");
const ROWS: &str = include_str!("../fixtures/seeds_sandboxes_rows.sql");

fn postgres() -> &'static PostgresServer {
    static PG: OnceLock<PostgresServer> = OnceLock::new();
    PG.get_or_init(|| {
        // The harness leaves by `exit`, which drops no statics: stop the server from an exit hook.
        extern "C" fn stop_at_exit() {
            if let Some(pg) = PG.get() {
                pg.shutdown();
            }
        }
        // SAFETY: registering a plain function with the C runtime's exit hooks.
        unsafe {
            libc::atexit(stop_at_exit);
        }
        PostgresServer::init().unwrap_or_else(|e| panic!("starting PostgreSQL: {e}"))
    })
}

async fn database(test: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pg = tokio::task::spawn_blocking(postgres).await.unwrap();
    pg.create_database(&format!("import_{test}_{}_{n}", std::process::id()))
        .await
        .unwrap()
}

async fn run_sql(url: &str, sql: &str) {
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut c)
        .await
        .unwrap_or_else(|e| panic!("running SQL: {e}\n{sql}"));
    c.close().await.unwrap();
}

/// A database with the seeds' schema, the drifted enum values and the fixture's rows, and the
/// instance id prefix of those rows: the fixture's `i-00000000000000aNN` ids are made unique to
/// the test (the duplicate check is cluster-wide, and tests share the control plane).
async fn seeded(test: &str) -> (String, String) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let prefix = format!("i-{:012x}{:02x}a", std::process::id(), n % 256);
    let url = database(test).await;
    run_sql(&url, SCHEMA).await;
    // Twice: the migrations are idempotent, as the seed says.
    run_sql(&url, SCHEMA).await;
    run_sql(&url, DRIFT).await;
    run_sql(&url, &ROWS.replace("i-00000000000000a", &prefix)).await;
    (url, prefix)
}

/// Runs `sandbox-operator import` with `env` and the shared control plane's kubeconfig.
fn import(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandbox-operator"));
    cmd.arg("import")
        .args(args)
        .env("KUBECONFIG", control_plane().kubeconfig_path())
        .env_remove("DATABASE_URL")
        .env_remove("SANDBOX_OPERATOR_EC2_ENDPOINT")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running sandbox-operator import")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "import failed ({})\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    o
}

/// The documents of a multi-document YAML stream, as Sandboxes.
fn sandboxes(yaml: &str) -> Vec<Sandbox> {
    use serde::Deserialize;
    if yaml.trim().is_empty() {
        return Vec::new();
    }
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Sandbox::deserialize(d).expect("a Sandbox document"))
        .collect()
}

fn by_name<'a>(list: &'a [Sandbox], name: &str) -> &'a Sandbox {
    list.iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no Sandbox {name} in {list:#?}"))
}

fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(args, stdin);
    assert!(out.status.success(), "kubectl {args:?}: {}", text(&out));
    text(&out)
}

/// Every instance id the Sandboxes of `ns` hold, checking none appears twice.
async fn instance_ids(ns: &str) -> BTreeSet<String> {
    let api: Api<Sandbox> = Api::namespaced(support::client().await, ns);
    let list = api.list(&ListParams::default()).await.unwrap();
    let mut seen = BTreeSet::new();
    for s in &list.items {
        let id = s
            .spec
            .instance_id
            .clone()
            .unwrap_or_else(|| panic!("{:?} adopts nothing", s.metadata.name));
        assert!(seen.insert(id.clone()), "instance {id} in two Sandboxes");
    }
    seen
}

/// A Sandbox adopting `instance` in `ns`, made before the import, as an earlier adoption by hand.
async fn adopted_by_hand(ns: &str, name: &str, instance: &str) {
    let api: Api<Sandbox> = Api::namespaced(support::client().await, ns);
    let body = serde_json::json!({
        "apiVersion": "fleet.valet.dev/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": name},
        "spec": {"environment": "staging", "instanceId": instance, "capacity": 3},
    });
    api.patch(name, &PatchParams::apply("by-hand"), &Patch::Apply(&body))
        .await
        .unwrap();
}

fn skipped_rows(ids: &str) -> Vec<(&'static str, String)> {
    let dup = format!("instance {ids}01 is also in row 00000000-0000-4000-8000-000000000001");
    SKIPPED_ROWS
        .iter()
        .map(|(row, why)| {
            (
                *row,
                if why.is_empty() {
                    dup.clone()
                } else {
                    why.to_string()
                },
            )
        })
        .collect()
}

/// The rows the fixture expects skipped, and why ("" for the duplicate, whose reason names the
/// test's instance id).
const SKIPPED_ROWS: &[(&str, &str)] = &[
    (
        "row 00000000-0000-4000-8000-000000000004 (\"provisioning-no-id\")",
        "no instance_id (status provisioning)",
    ),
    (
        "row 00000000-0000-4000-8000-000000000005 (\"old-terminated\")",
        "status terminated",
    ),
    (
        "row 00000000-0000-4000-8000-000000000006 (\"qa-box\")",
        "environment \"qa\" is not one of dev, staging, prod",
    ),
    (
        "row 00000000-0000-4000-8000-000000000007 (\"firefox-box\")",
        "browser_engine \"firefox\" is not one of chromium, adspower",
    ),
    (
        "row 00000000-0000-4000-8000-000000000008 (\"placeholder\")",
        "instance_id \"i-0abc123def456\" is not an EC2 instance id",
    ),
    (
        "row 00000000-0000-4000-8000-000000000009 (\"staging-sandbox-1-again\")",
        "",
    ),
    (
        "row 00000000-0000-4000-8000-000000000011 (\"terminating-box\")",
        "status terminating",
    ),
    (
        "row 00000000-0000-4000-8000-000000000012 (\"maintenance-box\")",
        "status \"maintenance\" is not one of",
    ),
];

fn assert_skips_named(report: &str, ids: &str) {
    for (row, why) in skipped_rows(ids) {
        let line = report
            .lines()
            .find(|l| l.starts_with(&format!("skip    {row}: ")))
            .unwrap_or_else(|| panic!("no skip line for {row} in\n{report}"));
        assert!(line.contains(&why), "{line:?} lacks {why:?}");
    }
    assert_eq!(
        report.lines().filter(|l| l.starts_with("skip ")).count(),
        SKIPPED_ROWS.len(),
        "{report}"
    );
}

#[tokio::test]
async fn database_rows_become_sandboxes_once_and_bad_rows_are_named() {
    let (url, ids) = seeded("rows").await;
    let client = support::client().await;
    let ns = support::namespace(&client, "import-rows").await;
    adopted_by_hand(&ns, "legacy", &format!("{ids}10")).await;
    let env = [("DATABASE_URL", url.as_str())];

    // The dry run: the diff, and nothing written.
    let dry = ok(import(
        &["--from", "database", "-n", &ns, "--dry-run"],
        &env,
    ));
    let plan = stdout(&dry);
    for want in [
        format!(
            "create  {ns}/staging-sandbox-1  {ids}01  from row 00000000-0000-4000-8000-000000000001 (\"staging-sandbox-1\"): staging, t3.medium, adspower, capacity 5, auto-stop 45m"
        ),
        format!("create  {ns}/prod-worker-2  {ids}02"),
        format!("create  {ns}/stopped-box  {ids}03"),
        format!(
            "exists  {ns}/legacy  {ids}10  from row 00000000-0000-4000-8000-000000000010 (\"already-adopted\")"
        ),
        "differs: capacity 3 in the cluster, 5 in the source".to_string(),
        "note: browser_config not carried".to_string(),
        "3 to create, 1 already Sandboxes, 8 skipped\n".to_string(),
        "dry run: nothing written".to_string(),
    ] {
        assert!(plan.contains(&want), "{want:?} not in\n{plan}");
    }
    assert!(plan.contains(", stopped\n"), "{plan}");
    assert_skips_named(&plan, &ids);
    assert_eq!(
        instance_ids(&ns).await.len(),
        1,
        "a dry run wrote something"
    );

    // Only staging: other environments are counted, unknown ones still named.
    let staging = ok(import(
        &[
            "--from",
            "database",
            "-n",
            &ns,
            "--dry-run",
            "--environment",
            "staging",
        ],
        &env,
    ));
    assert!(
        stdout(&staging).contains(
            "2 to create, 1 already Sandboxes, 4 skipped, 5 of other environments not selected"
        ),
        "{}",
        stdout(&staging)
    );
    assert!(stdout(&staging).contains("(\"qa-box\")"));

    // The manifests: one stream on stdout, the report on stderr.
    let out = ok(import(&["--from", "database", "-n", &ns], &env));
    let yaml = stdout(&out);
    let report = stderr(&out);
    assert_skips_named(&report, &ids);
    assert!(report.contains(&format!("exists  {ns}/legacy")), "{report}");
    assert!(
        !yaml.contains("image"),
        "image.tag is the deploy's:\n{yaml}"
    );
    let docs = sandboxes(&yaml);
    assert_eq!(docs.len(), 3, "{yaml}");

    let s1 = by_name(&docs, "staging-sandbox-1");
    assert_eq!(s1.metadata.namespace.as_deref(), Some(ns.as_str()));
    assert_eq!(s1.spec.instance_id, Some(format!("{ids}01")));
    assert_eq!(s1.spec.environment, Environment::Staging);
    assert_eq!(s1.spec.instance_type.as_deref(), Some("t3.medium"));
    assert_eq!(s1.spec.browser_engine, BrowserEngine::Adspower);
    assert_eq!(s1.spec.capacity, 5);
    assert_eq!(s1.spec.auto_stop.as_ref().unwrap().idle_after, "45m");
    assert_eq!(s1.spec.power_state, PowerState::Running);
    let labels = s1.metadata.labels.clone().unwrap();
    assert_eq!(labels["team"], "growth");
    assert_eq!(labels["fleet.valet.dev/imported-from"], "database");
    let ann = s1.metadata.annotations.clone().unwrap();
    assert!(ann["fleet.valet.dev/imported-tags"].contains("owner email"));

    let s2 = by_name(&docs, "prod-worker-2");
    assert_eq!(s2.spec.environment, Environment::Prod);
    assert_eq!(s2.spec.browser_engine, BrowserEngine::Chromium);
    assert_eq!(s2.spec.capacity, 8);
    assert!(s2.spec.auto_stop.is_none());
    assert_eq!(
        s2.metadata.annotations.as_ref().unwrap()["fleet.valet.dev/imported-name"],
        "Prod Worker 2"
    );
    let s3 = by_name(&docs, "stopped-box");
    assert_eq!(s3.spec.power_state, PowerState::Stopped);
    assert_eq!(s3.spec.auto_stop.as_ref().unwrap().idle_after, "30m");

    // The API server accepts them as they are: a server-side dry run, then for real, as a
    // GitOps tool would apply them.
    let dry_apply = kubectl_ok(
        &["apply", "--server-side", "--dry-run=server", "-f", "-"],
        Some(&yaml),
    );
    assert_eq!(
        dry_apply.matches("(server dry run)").count(),
        3,
        "{dry_apply}"
    );
    kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "gitops",
            "-f",
            "-",
        ],
        Some(&yaml),
    );
    let ids = instance_ids(&ns).await;
    assert_eq!(ids.len(), 4, "{ids:?}");

    // Run again: everything is there, nothing is written twice.
    let again = ok(import(&["--from", "database", "-n", &ns], &env));
    assert!(sandboxes(&stdout(&again)).is_empty(), "{}", stdout(&again));
    assert!(
        stderr(&again).contains("0 to create, 4 already Sandboxes, 8 skipped"),
        "{}",
        stderr(&again)
    );
    // Another namespace does not hide them: the check is cluster-wide.
    let other = support::namespace(&client, "import-rows-other").await;
    let elsewhere = ok(import(&["--from", "database", "-n", &other], &env));
    assert!(sandboxes(&stdout(&elsewhere)).is_empty());
    assert!(
        stderr(&elsewhere).contains(&format!("exists  {ns}/staging-sandbox-1")),
        "{}",
        stderr(&elsewhere)
    );
    assert_eq!(instance_ids(&ns).await, ids);
}

#[tokio::test]
async fn database_import_writes_a_gitops_directory_and_applies_server_side() {
    let (url, _) = seeded("dir").await;
    let client = support::client().await;
    let ns = support::namespace(&client, "import-dir").await;
    let env = [("DATABASE_URL", url.as_str())];
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("fleet");
    let out_dir_s = out_dir.to_str().unwrap();

    let out = ok(import(
        &[
            "--from",
            "database",
            "--out-dir",
            out_dir_s,
            "--label",
            "fleet.valet.dev/pool=workers",
            "--agent-token-secret",
            "agent-token",
        ],
        &env,
    ));
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    assert!(stderr(&out).contains("wrote 4 files"), "{}", stderr(&out));
    let mut files: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "already-adopted.yaml",
            "prod-worker-2.yaml",
            "staging-sandbox-1.yaml",
            "stopped-box.yaml"
        ]
    );
    let one = std::fs::read_to_string(out_dir.join("staging-sandbox-1.yaml")).unwrap();
    assert!(one.starts_with("# Imported by sandbox-operator import from sandboxes/"));
    let s: Sandbox = serde_yaml::from_str(&one).unwrap();
    assert!(s.metadata.namespace.is_none(), "no namespace unless asked");
    assert_eq!(
        s.metadata.labels.as_ref().unwrap()["fleet.valet.dev/pool"],
        "workers"
    );
    assert_eq!(
        s.spec
            .agent
            .token_secret_ref
            .as_ref()
            .map(|r| r.key.as_str()),
        Some("token")
    );
    kubectl_ok(
        &[
            "apply",
            "-n",
            &ns,
            "--server-side",
            "--dry-run=server",
            "-f",
            out_dir_s,
        ],
        None,
    );
    assert!(instance_ids(&ns).await.is_empty());

    // --apply: server-side apply under the import's field manager, once.
    let applied = ok(import(&["--from", "database", "-n", &ns, "--apply"], &env));
    let log = stderr(&applied);
    for name in [
        "staging-sandbox-1",
        "prod-worker-2",
        "stopped-box",
        "already-adopted",
    ] {
        assert!(log.contains(&format!("applied {ns}/{name}")), "{log}");
    }
    assert!(stdout(&applied).is_empty());
    let api: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let s1 = api.get("staging-sandbox-1").await.unwrap();
    assert!(
        s1.metadata
            .managed_fields
            .unwrap_or_default()
            .iter()
            .any(|m| m.manager.as_deref() == Some("sandbox-operator-import")
                && m.operation.as_deref() == Some("Apply")),
        "not applied by the import's field manager"
    );
    let ids = instance_ids(&ns).await;
    assert_eq!(ids.len(), 4, "{ids:?}");
    let again = ok(import(&["--from", "database", "-n", &ns, "--apply"], &env));
    assert!(!stderr(&again).contains("applied "), "{}", stderr(&again));
    assert!(stderr(&again).contains("0 to create"), "{}", stderr(&again));
    assert_eq!(instance_ids(&ns).await, ids);
}

async fn launch(ec2: &aws_sdk_ec2::Client, ami: &str, tags: &[(&str, &str)]) -> String {
    let mut spec = TagSpecification::builder().resource_type(ResourceType::Instance);
    for (k, v) in tags {
        spec = spec.tags(Tag::builder().key(*k).value(*v).build());
    }
    ec2.run_instances()
        .image_id(ami)
        .instance_type(InstanceType::T3Large)
        .min_count(1)
        .max_count(1)
        .tag_specifications(spec.build())
        .send()
        .await
        .expect("RunInstances")
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_owned()
}

async fn state(ec2: &aws_sdk_ec2::Client, id: &str) -> String {
    ec2.describe_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap()
        .reservations()[0]
        .instances()[0]
        .state()
        .and_then(|s| s.name())
        .map(|n| n.as_str().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn ec2_instances_selected_by_tag_are_adopted_as_they_are() {
    let ep = Ec2Endpoint::start(Ec2EndpointOptions::default())
        .await
        .expect("EC2 endpoint (did `hack/install-tools.sh venv` run?)");
    let ec2 = ep.client().await;
    let ami = ep.defaults().await.unwrap().ami;
    let role = ("Role", "ghosthands");
    let a = launch(
        &ec2,
        &ami,
        &[
            role,
            ("Name", "GH Worker 1"),
            ("Environment", "staging"),
            ("BrowserEngine", "adspower"),
            ("Capacity", "4"),
        ],
    )
    .await;
    let b = launch(
        &ec2,
        &ami,
        &[role, ("Name", "gh-worker-2"), ("Environment", "staging")],
    )
    .await;
    let no_env = launch(&ec2, &ami, &[role, ("Name", "no-env")]).await;
    let other = launch(&ec2, &ami, &[("Role", "other"), ("Environment", "staging")]).await;
    let gone = launch(&ec2, &ami, &[role, ("Environment", "staging")]).await;
    let ours = launch(
        &ec2,
        &ami,
        &[
            role,
            ("Environment", "staging"),
            ("fleet.valet.dev/managed-by", "sandbox-operator"),
            ("fleet.valet.dev/namespace", "fleet"),
            ("fleet.valet.dev/name", "worker-9"),
        ],
    )
    .await;
    let qa = launch(&ec2, &ami, &[role, ("Environment", "qa")]).await;
    ec2.stop_instances().instance_ids(&b).send().await.unwrap();
    ec2.terminate_instances()
        .instance_ids(&gone)
        .send()
        .await
        .unwrap();
    support::eventually(60, "b stopped and gone terminated", || {
        let (ec2, b, gone) = (ec2.clone(), b.clone(), gone.clone());
        async move {
            (state(&ec2, &b).await == "stopped" && state(&ec2, &gone).await == "terminated")
                .then_some(())
        }
    })
    .await;

    let client = support::client().await;
    let ns = support::namespace(&client, "import-ec2").await;
    let url = ep.url();
    let args = [
        "--from",
        "ec2",
        "--ec2-tag",
        "Role=ghosthands",
        "--ec2-endpoint",
        url.as_str(),
        "--region",
        "us-east-1",
        "-n",
        ns.as_str(),
    ];
    let out = ok(import(&args, &[]));
    let yaml = stdout(&out);
    let report = stderr(&out);
    let docs = sandboxes(&yaml);
    assert_eq!(docs.len(), 2, "{yaml}\n{report}");
    let sa = by_name(&docs, "gh-worker-1");
    assert_eq!(sa.spec.instance_id.as_deref(), Some(a.as_str()));
    assert_eq!(sa.spec.environment, Environment::Staging);
    assert_eq!(sa.spec.browser_engine, BrowserEngine::Adspower);
    assert_eq!(sa.spec.capacity, 4);
    assert_eq!(sa.spec.instance_type.as_deref(), Some("t3.large"));
    assert_eq!(sa.spec.power_state, PowerState::Running);
    assert_eq!(sa.metadata.labels.as_ref().unwrap()["Role"], "ghosthands");
    let sb = by_name(&docs, "gh-worker-2");
    assert_eq!(sb.spec.instance_id.as_deref(), Some(b.as_str()));
    assert_eq!(sb.spec.power_state, PowerState::Stopped);
    for (id, why) in [
        (
            &no_env,
            "no Environment tag, and --environment is not given",
        ),
        (&gone, "instance is terminated"),
        (&ours, "launched by the operator for Sandbox fleet/worker-9"),
        (&qa, "environment tag \"qa\""),
    ] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with(&format!("skip    instance {id}")) && l.contains(why)),
            "no skip line for {id} ({why}) in\n{report}"
        );
    }
    assert!(
        !report.contains(&other) && !yaml.contains(&other),
        "{report}"
    );
    assert!(
        report.contains("2 to create, 0 already Sandboxes, 4 skipped"),
        "{report}"
    );

    // Valid for the API server, then applied; the operator adopts both as they are: no start,
    // stop, launch or terminate.
    kubectl_ok(
        &["apply", "--server-side", "--dry-run=server", "-f", "-"],
        Some(&yaml),
    );
    kubectl_ok(&["apply", "--server-side", "-f", "-"], Some(&yaml));
    ep.reset_calls().await.unwrap();
    let op = Operator::start(&ns, &url, &[]);
    let api: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    support::eventually(90, "both Sandboxes to report their instances", || {
        let api = api.clone();
        async move {
            let st = |s: Sandbox| {
                s.status
                    .and_then(|st| st.instance)
                    .and_then(|i| i.state)
                    .map(|s| s.as_str())
                    .unwrap_or_default()
            };
            let a = st(api.get("gh-worker-1").await.ok()?);
            let b = st(api.get("gh-worker-2").await.ok()?);
            (a == "running" && b == "stopped").then_some(())
        }
    })
    .await;
    // A few more reconciles' worth of time for a wrong start to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = ep.calls().await.unwrap();
    for action in [
        "RunInstances",
        "StartInstances",
        "StopInstances",
        "TerminateInstances",
    ] {
        assert_eq!(
            calls.accepted(action),
            0,
            "{action}: {calls:?}\n{}",
            op.logs()
        );
    }
    assert_eq!(state(&ec2, &b).await, "stopped");
    drop(op);

    // Again, with the Sandboxes there: nothing new.
    let again = ok(import(&args, &[]));
    assert!(sandboxes(&stdout(&again)).is_empty(), "{}", stdout(&again));
    assert!(
        stderr(&again).contains("0 to create, 2 already Sandboxes, 4 skipped"),
        "{}",
        stderr(&again)
    );
    // --environment fills in a missing tag.
    let with_env = ok(import(
        &[&args[..], &["--environment", "staging", "--dry-run"][..]].concat(),
        &[],
    ));
    assert!(
        stdout(&with_env).contains(&format!("create  {ns}/no-env  {no_env}")),
        "{}",
        stdout(&with_env)
    );
}

#[tokio::test]
async fn sources_that_cannot_be_read_get_a_clear_answer_without_the_password() {
    let pg = tokio::task::spawn_blocking(postgres).await.unwrap();

    let o = import(&["--from", "database", "--no-cluster"], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--from database needs --database-url or DATABASE_URL"),
        "{}",
        stderr(&o)
    );

    let password = "Sup3r-Secret-Pa55";
    let missing_db = format!(
        "postgres://postgres:{password}@127.0.0.1:{}/nope",
        pg.port()
    );
    let o = import(
        &["--from", "database", "--no-cluster"],
        &[("DATABASE_URL", &missing_db)],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "connecting to postgres://127.0.0.1:{}/nope",
            pg.port()
        )),
        "{err}"
    );
    assert!(!err.contains(password), "{err}");

    let empty = database("empty").await;
    // The client has no TLS: a URL that requires it is refused, never sent in clear.
    let o = import(
        &["--from", "database", "--no-cluster"],
        &[("DATABASE_URL", &format!("{empty}?sslmode=require"))],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("TLS"), "{}", stderr(&o));
    let o = import(
        &["--from", "database", "--no-cluster"],
        &[("DATABASE_URL", &empty)],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no table public.sandboxes"),
        "{}",
        stderr(&o)
    );

    let o = import(
        &[
            "--from",
            "database",
            "--no-cluster",
            "--table",
            "sandboxes; drop",
        ],
        &[("DATABASE_URL", &empty)],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not a plain SQL identifier"),
        "{}",
        stderr(&o)
    );

    let o = import(&["--from", "ec2", "--no-cluster"], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("at least one --ec2-tag"),
        "{}",
        stderr(&o)
    );

    // No cluster to check against: refused, with the way out named.
    let (seeded, _) = seeded("nocluster").await;
    let home = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_sandbox-operator"))
        .args(["import", "--from", "database"])
        .env("DATABASE_URL", &seeded)
        .env("KUBECONFIG", home.path().join("missing"))
        .env("HOME", home.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--no-cluster"), "{}", stderr(&o));
    // With --no-cluster it works offline.
    let o = ok(import(
        &["--from", "database", "--no-cluster"],
        &[("DATABASE_URL", &seeded)],
    ));
    assert_eq!(sandboxes(&stdout(&o)).len(), 4, "{}", stderr(&o));
}

/// FIGURE: a 1,000-row table imported through the binary: read, checked against the cluster,
/// written as 1,000 files. Timed, never asserted on.
#[tokio::test]
async fn import_of_1000_rows() {
    let url = database("thousand").await;
    run_sql(&url, SCHEMA).await;
    run_sql(
        &url,
        "INSERT INTO sandboxes (name, environment, instance_id, instance_type, status, capacity,
                                browser_engine, ec2_status, auto_stop_enabled,
                                idle_minutes_before_stop, tags, created_at)
         SELECT 'worker ' || n,
                (ARRAY['dev', 'staging', 'prod'])[1 + n % 3]::sandbox_environment,
                'i-' || lpad(to_hex(1000000 + n), 17, '0'),
                't3.large',
                CASE WHEN n % 10 = 0 THEN 'stopped' ELSE 'active' END::sandbox_status,
                1 + n % 8,
                CASE WHEN n % 2 = 0 THEN 'adspower' ELSE 'chromium' END::browser_engine,
                CASE WHEN n % 10 = 0 THEN 'stopped' ELSE 'running' END::ec2_status,
                n % 4 = 0, 15 + n % 60,
                jsonb_build_object('team', 'team-' || n % 7),
                timestamptz '2025-01-01' + n * interval '1 minute'
         FROM generate_series(1, 1000) AS n",
    )
    .await;
    let client = support::client().await;
    let ns = support::namespace(&client, "import-1000").await;
    // Three runs (each into a fresh directory; nothing is applied, so each creates 1,000): the
    // machine may be shared, and the median says more than one run.
    let mut runs = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let out_dir = dir.path().join("fleet");
        let cpu_before = children_cpu();
        let started = Instant::now();
        let out = ok(import(
            &[
                "--from",
                "database",
                "-n",
                &ns,
                "--out-dir",
                out_dir.to_str().unwrap(),
            ],
            &[("DATABASE_URL", &url)],
        ));
        runs.push((started.elapsed(), children_cpu() - cpu_before));
        assert!(
            stderr(&out).contains("1000 to create, 0 already Sandboxes, 0 skipped"),
            "{}",
            stderr(&out)
        );
        assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 1000);
        assert_valid_sample(&out_dir, &ns);
    }
    runs.sort();
    let (wall, cpu) = runs[1];
    println!(
        "FIGURE import_1000_rows_seconds={:.2} cpu_seconds={:.2} (median of 3; all wall: {:?}; sandbox-operator import --from database --out-dir, debug build: read 1,000 rows from PostgreSQL, list the cluster's Sandboxes, write 1,000 files; cpu is the process's user+system time, less sensitive to a busy machine than the wall time)",
        wall.as_secs_f64(),
        cpu.as_secs_f64(),
        runs.iter()
            .map(|r| format!("{:.2}s", r.0.as_secs_f64()))
            .collect::<Vec<_>>()
    );
}

/// User and system CPU time of the children this process has waited for.
fn children_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given; zeroed is a valid initial value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage struct.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// A few of the 1,000 files through a server-side dry run (all of them would only time kubectl).
fn assert_valid_sample(dir: &Path, ns: &str) {
    let mut stream = String::new();
    for name in ["worker-1", "worker-500", "worker-1000"] {
        stream.push_str("---\n");
        stream.push_str(&std::fs::read_to_string(dir.join(format!("{name}.yaml"))).unwrap());
    }
    let out = kubectl_ok(
        &[
            "apply",
            "-n",
            ns,
            "--server-side",
            "--dry-run=server",
            "-f",
            "-",
        ],
        Some(&stream),
    );
    assert_eq!(out.matches("(server dry run)").count(), 3, "{out}");
}
