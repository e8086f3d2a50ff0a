use super::*;
use crate::api::{InstanceStatus, SandboxStatus};

const ID_A: &str = "i-0123456789abcdef0";
const ID_B: &str = "i-0fedcba9876543210";
const ID_C: &str = "i-0a1b2c3d";

/// A row as the seeds' admin API wrote it for a registered staging sandbox (seed 000,
/// "Register Existing Instance via API", with a real-length instance id) after 0009.
fn seed_row() -> TableRow {
    TableRow {
        id: "7c0e8f52-0000-4000-8000-000000000001".into(),
        name: Some("staging-sandbox-1".into()),
        environment: Some("staging".into()),
        instance_id: Some(ID_A.into()),
        instance_type: Some("t3.medium".into()),
        status: Some("active".into()),
        ec2_status: Some("running".into()),
        capacity: Some(5),
        browser_engine: Some("adspower".into()),
        auto_stop_enabled: Some(true),
        idle_minutes_before_stop: Some(45),
        tags: Some(r#"{"team": "growth", "owner email": "ops@valet.dev", "tier": 2}"#.into()),
        browser_config: Some("{}".into()),
    }
}

fn candidate(m: Mapped) -> Candidate {
    match m {
        Mapped::Candidate(c) => *c,
        other => panic!("expected a candidate, got {other:?}"),
    }
}

fn skip_reason(m: Mapped) -> String {
    match m {
        Mapped::Skip { reason, .. } => reason,
        other => panic!("expected a skip, got {other:?}"),
    }
}

#[test]
fn a_seeds_row_becomes_an_adopting_sandbox_with_its_settings() {
    let c = candidate(map_row(&seed_row(), &Options::default()));
    assert_eq!(c.base_name, "staging-sandbox-1");
    assert_eq!(c.instance_id, ID_A);
    let s = &c.spec;
    assert_eq!(s.instance_id.as_deref(), Some(ID_A));
    assert!(s.launch.is_none());
    assert_eq!(s.environment, Environment::Staging);
    assert_eq!(s.instance_type.as_deref(), Some("t3.medium"));
    assert_eq!(s.browser_engine, BrowserEngine::Adspower);
    assert_eq!(s.capacity, 5);
    assert_eq!(s.auto_stop.as_ref().unwrap().idle_after, "45m");
    assert_eq!(s.power_state, PowerState::Running);
    assert_eq!(s.management_policy, ManagementPolicy::Full);
    assert_eq!(s.deletion_policy, Some(DeletionPolicy::Retain));
    assert!(
        s.image.is_none(),
        "image.tag belongs to the deploy's field manager"
    );
    // Tags that are labels become labels (numbers as text); the rest is kept, not dropped.
    assert_eq!(c.labels.get("team").map(String::as_str), Some("growth"));
    assert_eq!(c.labels.get("tier").map(String::as_str), Some("2"));
    assert_eq!(
        c.labels.get(IMPORTED_FROM_LABEL).map(String::as_str),
        Some("database")
    );
    let kept: serde_json::Value =
        serde_json::from_str(&c.annotations[IMPORTED_TAGS_ANNOTATION]).unwrap();
    assert_eq!(kept, serde_json::json!({"owner email": "ops@valet.dev"}));
    assert_eq!(
        c.annotations[IMPORT_SOURCE_ANNOTATION],
        "sandboxes/7c0e8f52-0000-4000-8000-000000000001"
    );
    // An empty browser_config says nothing; the invalid tag is noted.
    assert_eq!(c.notes.len(), 1, "{:?}", c.notes);
}

#[test]
fn rows_the_api_cannot_express_are_skipped_naming_the_value() {
    let opts = Options::default();
    type Change = Box<dyn Fn(&mut TableRow)>;
    let cases: Vec<(&str, Change, &str)> = vec![
        (
            "unknown environment",
            Box::new(|r| r.environment = Some("qa".into())),
            "environment \"qa\" is not one of dev, staging, prod",
        ),
        (
            "NULL environment",
            Box::new(|r| r.environment = None),
            "environment is NULL",
        ),
        (
            "unknown engine",
            Box::new(|r| r.browser_engine = Some("firefox".into())),
            "browser_engine \"firefox\" is not one of chromium, adspower",
        ),
        (
            "unknown status",
            Box::new(|r| r.status = Some("maintenance".into())),
            "status \"maintenance\" is not one of",
        ),
        (
            "unknown ec2 status",
            Box::new(|r| r.ec2_status = Some("hibernated".into())),
            "ec2_status \"hibernated\"",
        ),
        (
            "NULL instance id",
            Box::new(|r| {
                r.instance_id = None;
                r.status = Some("provisioning".into());
            }),
            "no instance_id (status provisioning)",
        ),
        (
            "empty instance id",
            Box::new(|r| r.instance_id = Some("  ".into())),
            "no instance_id",
        ),
        (
            "the seed's placeholder id",
            Box::new(|r| r.instance_id = Some("i-0abc123def456".into())),
            "instance_id \"i-0abc123def456\" is not an EC2 instance id",
        ),
        (
            "terminated",
            Box::new(|r| r.status = Some("terminated".into())),
            "status terminated",
        ),
        (
            "terminating",
            Box::new(|r| r.status = Some("terminating".into())),
            "status terminating",
        ),
        (
            "terminated in EC2",
            Box::new(|r| r.ec2_status = Some("terminated".into())),
            "ec2_status terminated",
        ),
        (
            "shutting down in EC2",
            Box::new(|r| r.ec2_status = Some("shutting-down".into())),
            "ec2_status shutting-down",
        ),
        (
            "capacity 0",
            Box::new(|r| r.capacity = Some(0)),
            "capacity 0 is outside 1-256",
        ),
        (
            "capacity 1000",
            Box::new(|r| r.capacity = Some(1000)),
            "capacity 1000 is outside 1-256",
        ),
        (
            "auto-stop after 0 minutes",
            Box::new(|r| r.idle_minutes_before_stop = Some(0)),
            "idle_minutes_before_stop 0",
        ),
        (
            "instance type with capitals",
            Box::new(|r| r.instance_type = Some("T3 Large".into())),
            "instance_type \"T3 Large\"",
        ),
    ];
    for (what, change, want) in cases {
        let mut row = seed_row();
        change(&mut row);
        let reason = skip_reason(map_row(&row, &opts));
        assert!(
            reason.contains(want),
            "{what}: reason {reason:?} lacks {want:?}"
        );
    }
}

#[test]
fn stopped_instances_stay_stopped_and_observe_only_drops_what_it_cannot_do() {
    let mut row = seed_row();
    row.ec2_status = Some("stopped".into());
    row.status = Some("active".into());
    let c = candidate(map_row(&row, &Options::default()));
    assert_eq!(c.spec.power_state, PowerState::Stopped);

    // No ec2_status (a database before 0009): the row's status says it.
    let mut row = seed_row();
    row.ec2_status = None;
    row.status = Some("stopped".into());
    let c = candidate(map_row(&row, &Options::default()));
    assert_eq!(c.spec.power_state, PowerState::Stopped);

    let observe = Options {
        management_policy: ManagementPolicy::ObserveOnly,
        ..Options::default()
    };
    let mut row = seed_row();
    row.ec2_status = Some("stopped".into());
    let c = candidate(map_row(&row, &observe));
    assert_eq!(c.spec.management_policy, ManagementPolicy::ObserveOnly);
    assert_eq!(c.spec.power_state, PowerState::Running);
    assert!(c.spec.auto_stop.is_none());
    assert!(
        c.notes
            .iter()
            .any(|n| n.contains("auto-stop after 45m not carried")),
        "{:?}",
        c.notes
    );
}

#[test]
fn missing_columns_take_the_seeds_defaults_and_the_flags() {
    // A database migrated only to 0004: no engine, no auto-stop columns.
    let row = TableRow {
        id: "1".into(),
        name: Some("Old Box #3".into()),
        environment: Some("prod".into()),
        instance_id: Some(ID_C.into()),
        status: Some("active".into()),
        ..TableRow::default()
    };
    let c = candidate(map_row(&row, &Options::default()));
    assert_eq!(c.spec.browser_engine, BrowserEngine::Adspower);
    assert_eq!(c.spec.capacity, SEED_DEFAULT_CAPACITY);
    assert!(c.spec.auto_stop.is_none());
    assert!(c.spec.instance_type.is_none());
    assert_eq!(c.base_name, "old-box-3");

    let opts = Options {
        browser_engine: Some(BrowserEngine::Chromium),
        capacity: Some(3),
        auto_stop: Some("1h".into()),
        ..Options::default()
    };
    let c = candidate(map_row(&row, &opts));
    assert_eq!(c.spec.browser_engine, BrowserEngine::Chromium);
    assert_eq!(c.spec.capacity, 3);
    assert_eq!(c.spec.auto_stop.unwrap().idle_after, "1h");
    // A value the row has wins over the flag.
    let c = candidate(map_row(&seed_row(), &opts));
    assert_eq!(c.spec.browser_engine, BrowserEngine::Adspower);
    assert_eq!(c.spec.capacity, 5);
    assert_eq!(c.spec.auto_stop.unwrap().idle_after, "45m");
}

#[test]
fn the_environment_filter_counts_other_environments_but_reports_unknown_ones() {
    let opts = Options {
        environment: Some(Environment::Prod),
        ..Options::default()
    };
    assert_eq!(map_row(&seed_row(), &opts), Mapped::NotSelected);
    let mut row = seed_row();
    row.environment = Some("production".into());
    assert!(skip_reason(map_row(&row, &opts)).contains("\"production\""));
}

#[test]
fn browser_config_is_noted_never_copied() {
    let mut row = seed_row();
    row.browser_config = Some(r#"{"adspower_api_key": "hunter2"}"#.into());
    let c = candidate(map_row(&row, &Options::default()));
    assert!(
        c.notes
            .iter()
            .any(|n| n.contains("browser_config not carried"))
    );
    let p = plan([Mapped::Candidate(Box::new(c))], &[], "fleet", true);
    let yaml = manifests_yaml(&p).unwrap();
    let report = report(&p, true);
    assert!(!yaml.contains("hunter2") && !report.contains("hunter2"));
}

#[test]
fn names_are_dns_labels_and_stable() {
    assert_eq!(
        dns_label("staging-sandbox-1").as_deref(),
        Some("staging-sandbox-1")
    );
    assert_eq!(
        dns_label("Prod Worker_02").as_deref(),
        Some("prod-worker-02")
    );
    assert_eq!(
        dns_label("--Ädspower..box--").as_deref(),
        Some("dspower-box")
    );
    assert_eq!(dns_label("***"), None);
    let long = "a".repeat(60) + "-bbbb";
    let l = dns_label(&long).unwrap();
    assert_eq!(l.len(), 63);
    assert!(!l.ends_with('-'));
    let s = suffixed_name(&"x".repeat(63), ID_A);
    assert!(s.len() <= 63 && s.ends_with("-0123456789abcdef0"), "{s}");
    assert_eq!(suffixed_name("box", ID_C), "box-0a1b2c3d");
    // The same input gives the same name, run after run.
    let a = candidate(map_row(&seed_row(), &Options::default()));
    let b = candidate(map_row(&seed_row(), &Options::default()));
    assert_eq!(a.base_name, b.base_name);
    // No name: the instance id, which is a valid name.
    let mut row = seed_row();
    row.name = None;
    assert_eq!(
        candidate(map_row(&row, &Options::default())).base_name,
        ID_A
    );
}

#[test]
fn label_keys_and_values_are_checked_as_kubernetes_does() {
    for ok in ["team", "app.kubernetes.io/part-of", "Role", "a_b.c-d"] {
        assert!(is_label_key(ok), "{ok}");
    }
    for bad in [
        "",
        "owner email",
        "-x",
        "a/b/c",
        "Upper.Case/x",
        &"k".repeat(64),
    ] {
        assert!(!is_label_key(bad), "{bad}");
    }
    assert!(is_label_value(""));
    assert!(!is_label_value("ops@valet.dev"));
    assert!(is_instance_id(ID_A) && is_instance_id(ID_C));
    assert!(!is_instance_id("i-0ABCDEF1") && !is_instance_id("i-0abc123def456"));
    assert!(is_instance_type("t3.large") && is_instance_type("c6i-flex.xlarge"));
    assert!(!is_instance_type("t3") && !is_instance_type("T3.large"));
}

fn instance(id: &str, state: &str, tags: &[(&str, &str)]) -> Ec2Instance {
    Ec2Instance {
        id: id.into(),
        state: state.into(),
        instance_type: Some("t3.large".into()),
        launch_time: None,
        tags: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

#[test]
fn an_ec2_instance_becomes_a_sandbox_from_its_tags() {
    let i = instance(
        ID_B,
        "stopped",
        &[
            ("Name", "GH Worker 7"),
            ("Environment", "Prod"),
            ("browser-engine", "chromium"),
            ("Capacity", "8"),
            ("Role", "ghosthands"),
            ("aws:cloudformation:stack-name", "x"),
            ("cost center", "R&D"),
        ],
    );
    let c = candidate(map_instance(&i, &Options::default()));
    assert_eq!(c.base_name, "gh-worker-7");
    assert_eq!(c.spec.environment, Environment::Prod);
    assert_eq!(c.spec.browser_engine, BrowserEngine::Chromium);
    assert_eq!(c.spec.capacity, 8);
    assert_eq!(c.spec.instance_type.as_deref(), Some("t3.large"));
    assert_eq!(c.spec.power_state, PowerState::Stopped);
    assert_eq!(c.labels.get("Role").map(String::as_str), Some("ghosthands"));
    assert_eq!(
        c.labels.get(IMPORTED_FROM_LABEL).map(String::as_str),
        Some("ec2")
    );
    assert!(
        !c.labels
            .keys()
            .any(|k| k.starts_with("aws:") || k == "Name")
    );
    assert!(c.annotations[IMPORTED_TAGS_ANNOTATION].contains("cost center"));

    // No environment tag: --environment says it; without it, a skip.
    let bare = instance(ID_B, "running", &[("Role", "ghosthands")]);
    assert!(skip_reason(map_instance(&bare, &Options::default())).contains("no Environment tag"));
    let opts = Options {
        environment: Some(Environment::Dev),
        auto_stop: Some("30m".into()),
        ..Options::default()
    };
    let c = candidate(map_instance(&bare, &opts));
    assert_eq!(c.spec.environment, Environment::Dev);
    assert_eq!(c.spec.capacity, SEED_DEFAULT_CAPACITY);
    assert_eq!(c.spec.browser_engine, BrowserEngine::Chromium);
    assert_eq!(c.spec.auto_stop.unwrap().idle_after, "30m");
    assert_eq!(c.base_name, ID_B);
    // --environment also filters tagged instances of other environments.
    assert_eq!(map_instance(&i, &opts), Mapped::NotSelected);
}

#[test]
fn ec2_instances_the_api_cannot_express_or_the_operator_owns_are_skipped() {
    let opts = Options::default();
    let launched = instance(
        ID_A,
        "running",
        &[
            (crate::ec2::TAG_MANAGED_BY, crate::ec2::MANAGED_BY_VALUE),
            (crate::ec2::TAG_NAMESPACE, "fleet"),
            (crate::ec2::TAG_NAME, "worker-1"),
        ],
    );
    assert!(
        skip_reason(map_instance(&launched, &opts))
            .contains("launched by the operator for Sandbox fleet/worker-1")
    );
    let env = [("Environment", "staging")];
    assert!(
        skip_reason(map_instance(&instance(ID_A, "terminated", &env), &opts))
            .contains("instance is terminated")
    );
    assert!(
        skip_reason(map_instance(&instance(ID_A, "shutting-down", &env), &opts))
            .contains("shutting-down")
    );
    assert!(
        skip_reason(map_instance(
            &instance(ID_A, "running", &[("env", "qa")]),
            &opts
        ))
        .contains("environment tag \"qa\"")
    );
    assert!(
        skip_reason(map_instance(
            &instance(
                ID_A,
                "running",
                &[("env", "dev"), ("BrowserEngine", "firefox")]
            ),
            &opts
        ))
        .contains("\"firefox\"")
    );
    assert!(
        skip_reason(map_instance(
            &instance(ID_A, "running", &[("env", "dev"), ("capacity", "lots")]),
            &opts
        ))
        .contains("capacity tag \"lots\"")
    );
}

fn existing(ns: &str, name: &str, spec_id: Option<&str>, status_id: Option<&str>) -> Existing {
    let spec = SandboxSpec {
        instance_id: spec_id.map(str::to_owned),
        ..candidate(map_row(&seed_row(), &Options::default())).spec
    };
    let mut s = Sandbox::new(name, spec);
    s.metadata.namespace = Some(ns.into());
    s.status = status_id.map(|id| SandboxStatus {
        instance: Some(InstanceStatus {
            id: id.into(),
            ..InstanceStatus::default()
        }),
        ..SandboxStatus::default()
    });
    Existing::from_sandbox(&s)
}

fn row(id: &str, name: &str, instance_id: &str) -> TableRow {
    TableRow {
        id: id.into(),
        name: Some(name.into()),
        instance_id: Some(instance_id.into()),
        ..seed_row()
    }
}

#[test]
fn the_plan_never_writes_an_instance_twice() {
    let opts = Options::default();
    let rows = [
        row("1", "worker-a", ID_A),
        // Registered twice in the old table: imported once, from its first row.
        row("2", "worker-a-again", ID_A),
        // Already adopted by a Sandbox (spec.instanceId) in another namespace.
        row("3", "worker-b", ID_B),
        // Already launched by a Sandbox (status.instance.id only).
        row("4", "worker-c", ID_C),
    ];
    let cluster = [
        existing("elsewhere", "b", Some(ID_B), None),
        existing("fleet", "c", None, Some(ID_C)),
    ];
    let p = plan(
        rows.iter().map(|r| map_row(r, &opts)),
        &cluster,
        "fleet",
        true,
    );
    assert_eq!(p.counts(), (1, 2, 1), "{p:#?}");
    let names: Vec<_> = p
        .manifests()
        .map(|m| m.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["worker-a"]);
    match &p.entries[1] {
        Entry::Skip { reason, .. } => {
            assert!(reason.contains("also in row 1"), "{reason}")
        }
        e => panic!("{e:?}"),
    }
    match &p.entries[2] {
        Entry::Exists {
            sandbox,
            instance_id,
            ..
        } => {
            assert_eq!(sandbox, "elsewhere/b");
            assert_eq!(instance_id, ID_B);
        }
        e => panic!("{e:?}"),
    }
    match &p.entries[3] {
        Entry::Exists { sandbox, .. } => assert_eq!(sandbox, "fleet/c"),
        e => panic!("{e:?}"),
    }
    let text = report(&p, true);
    assert!(
        text.contains("create  fleet/worker-a  i-0123456789abcdef0"),
        "{text}"
    );
    assert!(
        text.contains("exists  elsewhere/b  i-0fedcba9876543210"),
        "{text}"
    );
    assert!(
        text.contains("skip    row 2 (\"worker-a-again\")"),
        "{text}"
    );
    assert!(
        text.ends_with("1 to create, 2 already Sandboxes, 1 skipped\n"),
        "{text}"
    );
}

#[test]
fn contested_names_get_the_instance_suffix_and_the_older_record_keeps_the_name() {
    let opts = Options::default();
    let rows = [
        row("1", "Worker A", ID_A),
        row("2", "worker-a", ID_B),
        row("3", "taken", ID_C),
    ];
    // "taken" belongs to a Sandbox of another instance in the target namespace; the same name
    // in another namespace does not count.
    let cluster = [
        existing("fleet", "taken", Some("i-0000000000000000a"), None),
        existing("other", "worker-a", Some("i-0000000000000000b"), None),
    ];
    let p = plan(
        rows.iter().map(|r| map_row(r, &opts)),
        &cluster,
        "fleet",
        false,
    );
    let names: Vec<_> = p
        .manifests()
        .map(|m| m.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        ["worker-a", "worker-a-0fedcba9876543210", "taken-0a1b2c3d"]
    );
    // The namespace is not written unless asked for.
    assert!(p.manifests().all(|m| m.metadata.namespace.is_none()));
    // The source's own spelling is kept where the name differs.
    let first = p.manifests().next().unwrap();
    assert_eq!(
        first.metadata.annotations.as_ref().unwrap()[IMPORTED_NAME_ANNOTATION],
        "Worker A"
    );
    let second = p.manifests().nth(1).unwrap();
    assert_eq!(
        second.metadata.annotations.as_ref().unwrap()[IMPORTED_NAME_ANNOTATION],
        "worker-a"
    );
}

#[test]
fn the_dry_run_shows_where_an_existing_sandbox_differs() {
    let mut changed = existing("fleet", "worker-a", Some(ID_A), None);
    if let Some(s) = changed.spec.as_mut() {
        s.capacity = 3;
        s.auto_stop = None;
    }
    let p = plan(
        [map_row(&row("1", "worker-a", ID_A), &Options::default())],
        &[changed],
        "fleet",
        true,
    );
    let text = report(&p, true);
    assert!(
        text.contains("differs: capacity 3 in the cluster, 5 in the source"),
        "{text}"
    );
    assert!(
        text.contains("differs: autoStop.idleAfter unset in the cluster, 45m in the source"),
        "{text}"
    );
    assert!(!text.contains("differs: environment"), "{text}");
}

#[test]
fn manifests_are_sandboxes_without_defaults_or_image() {
    let opts = Options {
        agent_token: Some(SecretKeyRef {
            name: "agent-token".into(),
            key: "token".into(),
        }),
        labels: [("fleet.valet.dev/pool".to_string(), "workers".to_string())].into(),
        ..Options::default()
    };
    let p = plan([map_row(&seed_row(), &opts)], &[], "fleet", true);
    let yaml = manifests_yaml(&p).unwrap();
    assert!(yaml.starts_with("---\napiVersion: fleet.valet.dev/v1alpha1\nkind: Sandbox\n"));
    for absent in [
        "image",
        "status",
        "managementPolicy",
        "powerState",
        "port:",
        "probeInterval",
        "launch",
    ] {
        assert!(!yaml.contains(absent), "{absent} in\n{yaml}");
    }
    assert!(yaml.contains("instanceId: i-0123456789abcdef0"), "{yaml}");
    assert!(yaml.contains("deletionPolicy: Retain"), "{yaml}");
    assert!(yaml.contains("idleAfter: 45m"), "{yaml}");
    assert!(yaml.contains("name: agent-token"), "{yaml}");
    // Read back as the API type: the same Sandbox, defaults filled in again.
    let doc = yaml.trim_start_matches("---\n");
    let back: Sandbox = serde_yaml::from_str(doc).unwrap();
    let want = p.manifests().next().unwrap();
    assert_eq!(back.spec, want.spec);
    assert_eq!(back.metadata.labels, want.metadata.labels);
    assert_eq!(back.metadata.namespace.as_deref(), Some("fleet"));

    // A stopped ObserveOnly import keeps powerState out (Running) and says ObserveOnly.
    let observe = Options {
        management_policy: ManagementPolicy::ObserveOnly,
        ..Options::default()
    };
    let p = plan([map_row(&seed_row(), &observe)], &[], "fleet", false);
    let yaml = manifests_yaml(&p).unwrap();
    assert!(yaml.contains("managementPolicy: ObserveOnly"), "{yaml}");
    assert!(
        !yaml.contains("autoStop") && !yaml.contains("namespace"),
        "{yaml}"
    );
}

#[test]
fn the_quiet_report_keeps_every_skip_and_note() {
    let mut bad = seed_row();
    bad.id = "9".into();
    bad.instance_id = None;
    let mut noted = row("1", "a", ID_A);
    noted.browser_config = Some(r#"{"x": 1}"#.into());
    let p = plan(
        [
            map_row(&noted, &Options::default()),
            map_row(&bad, &Options::default()),
            Mapped::NotSelected,
        ],
        &[],
        "fleet",
        true,
    );
    let text = report(&p, false);
    assert!(!text.contains("create "), "{text}");
    assert!(
        text.contains("note: row 1 (\"a\"): browser_config not carried"),
        "{text}"
    );
    assert!(
        text.contains("skip    row 9 (\"staging-sandbox-1\"): no instance_id"),
        "{text}"
    );
    assert!(
        text.ends_with(
            "1 to create, 0 already Sandboxes, 1 skipped, 1 of other environments not selected\n"
        ),
        "{text}"
    );
}
