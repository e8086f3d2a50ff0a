//! The fleet ledger on both backends: SQLite files in temporary directories, and a real
//! PostgreSQL server from Debian's packages on loopback (one shared by these tests, each test in
//! its own database; the outage test starts its own so it can stop it).

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::Parser;
use jiff::{SignedDuration, Timestamp};
use prometheus_client::registry::Registry;
use sandbox_operator::api::{
    AgentHealth, AgentStatus, Environment, InstanceStatus, Market, Sandbox, SandboxPhase,
    SandboxSpec, SandboxStatus,
};
use sandbox_operator::ledger::bench::{Synthetic, bench_writer};
use sandbox_operator::ledger::report::run_report_at;
use sandbox_operator::ledger::*;
use sandbox_operator::testenv::postgres::PostgresServer;
use sqlx::{Connection, Row};

// ---------------------------------------------------------------------------------------------
// Fixtures

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Db {
    Sqlite,
    Postgres,
}

/// A fresh, empty ledger database; the directory (SQLite) lives as long as this.
struct TestDb {
    url: String,
    dir: Option<tempfile::TempDir>,
}

pub(crate) fn shared_postgres() -> &'static PostgresServer {
    static PG: OnceLock<PostgresServer> = OnceLock::new();
    PG.get_or_init(|| {
        // The harness leaves by `exit`, which drops no statics: stop the server and remove its
        // files from an exit hook (were the binary killed, the kernel still ends the server).
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

async fn fresh(db: Db, test: &str) -> TestDb {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match db {
        Db::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
            TestDb {
                url,
                dir: Some(dir),
            }
        }
        Db::Postgres => {
            let pg = tokio::task::spawn_blocking(shared_postgres).await.unwrap();
            let name = format!("{test}_{}_{n}", std::process::id());
            let url = pg.create_database(&name).await.unwrap();
            TestDb { url, dir: None }
        }
    }
}

/// Runs `sql` with plain sqlx (not the ledger's code) and returns every value as text: the way a
/// dashboard reads the tables. Cast non-text columns in the SQL.
async fn sql(url: &str, sql: &'static str) -> Vec<Vec<Option<String>>> {
    fn text<R: Row>(rows: Vec<R>) -> Vec<Vec<Option<String>>>
    where
        for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        usize: sqlx::ColumnIndex<R>,
    {
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| r.try_get::<Option<String>, _>(i).unwrap())
                    .collect()
            })
            .collect()
    }
    if url.starts_with("postgres") {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        let rows = sqlx::query(sql).fetch_all(&mut c).await.unwrap();
        text(rows)
    } else {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        let rows = sqlx::query(sql).fetch_all(&mut c).await.unwrap();
        text(rows)
    }
}

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn small_writer() -> WriterOptions {
    WriterOptions {
        retry_max: Duration::from_millis(500),
        ..WriterOptions::default()
    }
}

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    Report(ReportArgs),
}

async fn report(args: &[&str], now: Timestamp) -> Result<String, LedgerError> {
    let mut argv = vec!["sandbox-operator", "report"];
    argv.extend_from_slice(args);
    let Command::Report(args) = Cli::try_parse_from(argv).unwrap().command;
    run_report_at(args, now).await
}

/// Both backends for one test body: `<name>::sqlite` and `<name>::postgres`.
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::Db::Sqlite).await
            }
            #[tokio::test]
            async fn postgres() {
                super::$name(super::Db::Postgres).await
            }
        }
    };
}

both_backends!(migrations_apply);
both_backends!(events_round_trip);
both_backends!(sandboxes_table_uses_the_seeds_columns);
both_backends!(a_terminated_sandbox_keeps_its_row);
both_backends!(cost_report_from_known_intervals);
both_backends!(fleet_and_deploy_reports);
both_backends!(queue_overflow_is_counted_and_logged);
both_backends!(secret_sync_stores_no_value);
both_backends!(writer_bench);

// ---------------------------------------------------------------------------------------------
// Tests

async fn migrations_apply(db: Db) {
    let d = fresh(db, "migrations").await;
    let ledger = Ledger::connect(&d.url).await.unwrap();
    assert_eq!(
        ledger.backend(),
        match db {
            Db::Sqlite => Backend::Sqlite,
            Db::Postgres => Backend::Postgres,
        }
    );
    ledger.close().await;
    // Again: the migrations are recorded and not re-applied.
    let ledger = Ledger::connect(&d.url).await.unwrap();
    ledger.close().await;
    let applied = sql(
        &d.url,
        "SELECT CAST(version AS TEXT), description FROM _sqlx_migrations ORDER BY version",
    )
    .await;
    assert_eq!(applied, vec![vec![Some("1".into()), Some("ledger".into())]]);
    for q in [
        "SELECT CAST(COUNT(*) AS TEXT) FROM ledger_events",
        "SELECT CAST(COUNT(*) AS TEXT) FROM power_intervals",
        "SELECT CAST(COUNT(*) AS TEXT) FROM sandboxes",
    ] {
        assert_eq!(sql(&d.url, q).await, vec![vec![Some("0".into())]], "{q}");
    }
    // A report does not create a missing SQLite ledger.
    if db == Db::Sqlite {
        let missing = format!(
            "sqlite://{}",
            d.dir.as_ref().unwrap().path().join("nope.db").display()
        );
        let err = Ledger::connect_existing(&missing).await.unwrap_err();
        assert!(matches!(err, LedgerError::Missing(_)), "{err}");
    }
}

fn sample_events() -> Vec<LedgerEvent> {
    let sbx = NamespacedName::new("fleet", "w1");
    vec![
        LedgerEvent::Ec2Action(Ec2ActionEvent {
            at: t("2024-05-01T10:00:00.123456789Z"),
            action: "RunInstances".into(),
            instance_id: Some("i-0123456789abcdef0".into()),
            sandbox: Some(sbx.clone()),
            outcome: Outcome::Succeeded,
            error_code: None,
            message: Some("launched".into()),
            request_id: Some("7a62c49f-347e-4fc4-9331-6e8eEXAMPLE".into()),
        }),
        LedgerEvent::Ec2Action(Ec2ActionEvent {
            at: t("2024-05-01T10:00:01Z"),
            action: "StopInstances".into(),
            instance_id: Some("i-0123456789abcdef0".into()),
            sandbox: Some(sbx.clone()),
            outcome: Outcome::Failed,
            error_code: Some("IncorrectInstanceState".into()),
            message: Some("the instance is pending".into()),
            request_id: None,
        }),
        PowerChange::new(
            "i-0123456789abcdef0",
            "t3.large",
            Market::Spot,
            true,
            t("2024-05-01T10:01:00Z"),
        )
        .sandbox("fleet", "w1")
        .into(),
        LedgerEvent::DeployStep(DeployStepEvent {
            at: t("2024-05-01T10:02:00Z"),
            namespace: "fleet".into(),
            deploy: Some("gh-abc123".into()),
            sandbox: Some("w1".into()),
            environment: Some(Environment::Staging),
            tag: "abc123".into(),
            previous_tag: Some("9f8e7d".into()),
            step: "Draining".into(),
            outcome: Outcome::Started,
            message: Some("waiting for 2 active workers".into()),
        }),
        LedgerEvent::SecretSync(SecretSyncEvent {
            at: t("2024-05-01T10:03:00Z"),
            bundle: NamespacedName::new("fleet", "worker-env"),
            target_kind: SecretTargetKind::FlyApp,
            target_name: "valet-worker-stg".into(),
            content_hash: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into(),
            keys: vec!["REDIS_URL".into(), "API_KEY".into()],
            outcome: Outcome::Succeeded,
            message: None,
        }),
    ]
}

async fn events_round_trip(db: Db) {
    let d = fresh(db, "roundtrip").await;
    let ledger = Ledger::connect(&d.url).await.unwrap();
    let handle = ledger.spawn_writer(small_writer());
    let events = sample_events();
    for e in &events {
        handle.record(e.clone());
    }
    handle.flush_within(Duration::from_secs(30)).await.unwrap();

    let stored = ledger.events(&EventQuery::default()).await.unwrap();
    let mut expected = events.clone();
    for e in &mut expected {
        e.sanitize();
    }
    let got: Vec<LedgerEvent> = stored.iter().map(|s| s.event.clone()).collect();
    assert_eq!(
        got, expected,
        "every event back, in order, to the nanosecond"
    );
    assert!(stored.windows(2).all(|w| w[0].id < w[1].id));

    // Filters.
    let deploys = ledger
        .events(&EventQuery {
            kind: Some("deploy_step".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(deploys.len(), 1);
    let later = ledger
        .events(&EventQuery {
            since: Some(t("2024-05-01T10:01:00Z")),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(later.len(), 3);

    // The columns a person queries by.
    let rows = sql(
        &d.url,
        "SELECT kind, action, instance_id, namespace, sandbox, outcome, request_id, message \
         FROM ledger_events WHERE kind = 'ec2_action' ORDER BY id",
    )
    .await;
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        rows[0],
        vec![
            s("ec2_action"),
            s("RunInstances"),
            s("i-0123456789abcdef0"),
            s("fleet"),
            s("w1"),
            s("succeeded"),
            s("7a62c49f-347e-4fc4-9331-6e8eEXAMPLE"),
            s("launched"),
        ]
    );
    assert_eq!(rows[1][5], s("failed"));
    assert_eq!(
        rows[1][7],
        s("IncorrectInstanceState: the instance is pending")
    );
    let rows = sql(
        &d.url,
        "SELECT deploy, sandbox, environment, tag, step, outcome FROM ledger_events \
         WHERE kind = 'deploy_step'",
    )
    .await;
    assert_eq!(
        rows[0],
        vec![
            s("gh-abc123"),
            s("w1"),
            s("staging"),
            s("abc123"),
            s("Draining"),
            s("started")
        ]
    );
    let rows = sql(
        &d.url,
        "SELECT bundle, target_kind, target_name, content_hash FROM ledger_events \
         WHERE kind = 'secret_sync'",
    )
    .await;
    assert_eq!(rows[0][1], s("fly_app"));
    // The running state opened a power interval.
    let rows = sql(
        &d.url,
        "SELECT instance_id, name, instance_type, market, CAST(stop_us AS TEXT) FROM power_intervals",
    )
    .await;
    assert_eq!(
        rows,
        vec![vec![
            s("i-0123456789abcdef0"),
            s("w1"),
            s("t3.large"),
            s("spot"),
            None
        ]]
    );
    assert_eq!(handle.dropped(), 0);
    assert_eq!(handle.metrics().written.get(), events.len() as u64);

    // Dropping the last handle: the writer writes what is queued, then ends, and leaves the
    // ledger's pool open for its reader.
    handle.record(sample_events().remove(0));
    drop(handle);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = ledger.events(&EventQuery::default()).await.unwrap().len();
        if n == events.len() + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the queued event was not written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(ledger.sandboxes().await.unwrap(), vec![]);
}

fn sandbox(name: &str, phase: SandboxPhase, state: &str, health: AgentHealth) -> Sandbox {
    let spec: SandboxSpec = serde_json::from_value(serde_json::json!({
        "environment": "staging",
        "instanceId": "i-0123456789abcdef0",
        "instanceType": "t3.medium",
        "browserEngine": "adspower",
        "capacity": 5,
        "autoStop": {"idleAfter": "45m"},
    }))
    .unwrap();
    let mut s = Sandbox::new(name, spec);
    s.metadata.namespace = Some("fleet".into());
    s.metadata.uid = Some(format!("uid-{name}"));
    s.status = Some(SandboxStatus {
        phase: Some(phase),
        instance: Some(InstanceStatus {
            id: "i-0123456789abcdef0".into(),
            instance_type: Some("t3.medium".into()),
            state: sandbox_operator::api::InstanceState::parse(state),
            public_ip: (state == "running").then(|| "34.197.248.80".into()),
            private_ip: Some("10.0.1.5".into()),
            market: Some(Market::OnDemand),
            ..Default::default()
        }),
        agent: Some(AgentStatus {
            health,
            url: None,
            image_tag: Some("v1.4.0".into()),
            active_workers: Some(3),
            cpu_percent: Some(12),
            memory_percent: Some(40),
            disk_percent: Some(20),
            draining_since: None,
            browser_status: None,
            up_since: None,
            env_sha256: None,
            agent_version: Some("0.1.0".into()),
            consecutive_failures: 0,
            last_seen: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(
                "2024-05-01T10:00:00Z",
            ))),
            message: None,
        }),
        last_started_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(
            "2024-05-01T09:00:00Z",
        ))),
        no_vnc_url: Some("http://34.197.248.80:6080/vnc.html".into()),
        ..Default::default()
    });
    s
}

async fn sandboxes_table_uses_the_seeds_columns(db: Db) {
    let d = fresh(db, "sandboxes").await;
    let ledger = Ledger::connect(&d.url).await.unwrap();
    let handle = ledger.spawn_writer(small_writer());
    let row = SandboxRow::from_sandbox(&sandbox(
        "w1",
        SandboxPhase::Active,
        "running",
        AgentHealth::Healthy,
    ));
    handle.upsert_sandbox(row.clone());
    handle.flush().await.unwrap();

    // A seeds dashboard query, by the seeds' column names.
    let rows = sql(
        &d.url,
        "SELECT name, environment, status, health_status, instance_id, instance_type, public_ip, \
         browser_engine, CAST(capacity AS TEXT), CAST(current_load AS TEXT), ec2_status, \
         novnc_url, CAST(CAST(auto_stop_enabled AS INTEGER) AS TEXT), \
         CAST(idle_minutes_before_stop AS TEXT), machine_type, gh_image_tag \
         FROM sandboxes WHERE status = 'active' AND health_status = 'healthy' \
         ORDER BY updated_at DESC",
    )
    .await;
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        rows,
        vec![vec![
            s("w1"),
            s("staging"),
            s("active"),
            s("healthy"),
            s("i-0123456789abcdef0"),
            s("t3.medium"),
            s("34.197.248.80"),
            s("adspower"),
            s("5"),
            s("3"),
            s("running"),
            s("http://34.197.248.80:6080/vnc.html"),
            s("1"),
            s("45"),
            s("ec2"),
            s("v1.4.0"),
        ]]
    );
    let times = sql(
        &d.url,
        "SELECT CAST(last_started_at AS TEXT), CAST(last_stopped_at AS TEXT), \
         CAST(last_health_check_at AS TEXT), CAST(updated_at AS TEXT) FROM sandboxes",
    )
    .await;
    assert!(times[0][0].as_deref().unwrap().starts_with("2024-05-01"));
    assert_eq!(times[0][1], None);
    assert!(times[0][2].is_some() && times[0][3].is_some());
    assert_eq!(ledger.sandboxes().await.unwrap(), vec![row.clone()]);

    // The instance stops: the same row changes; the health is not a false "unhealthy".
    let stopped = SandboxRow::from_sandbox(&sandbox(
        "w1",
        SandboxPhase::Stopped,
        "stopped",
        AgentHealth::Unknown,
    ));
    handle.upsert_sandbox(stopped.clone());
    handle.upsert_sandbox(SandboxRow::new("fleet", "w2", Environment::Prod));
    handle.flush().await.unwrap();
    let rows = sql(
        &d.url,
        "SELECT name, status, health_status, ec2_status, public_ip FROM sandboxes ORDER BY name",
    )
    .await;
    assert_eq!(
        rows,
        vec![
            vec![s("w1"), s("stopped"), s("unknown"), s("stopped"), None],
            vec![s("w2"), s("provisioning"), s("unknown"), None, None],
        ]
    );

    // An upsert that changes nothing but the time is not written again.
    let before = ledger.sandboxes().await.unwrap();
    let mut same = stopped.clone();
    same.updated_at = stopped.updated_at + SignedDuration::from_secs(60);
    handle.upsert_sandbox(same);
    handle.flush().await.unwrap();
    assert_eq!(ledger.sandboxes().await.unwrap(), before);

    handle.delete_sandbox("fleet", "w1");
    handle.flush().await.unwrap();
    let rows = sql(&d.url, "SELECT name FROM sandboxes").await;
    assert_eq!(rows, vec![vec![s("w2")]]);
}

/// What the Sandbox controller writes when a Sandbox goes with its instance terminated: the row
/// stays, with status terminated, so dashboards count what ran.
async fn a_terminated_sandbox_keeps_its_row(db: Db) {
    let d = fresh(db, "terminated").await;
    let ledger = Ledger::connect(&d.url).await.unwrap();
    let handle = ledger.spawn_writer(small_writer());
    let running = sandbox("w1", SandboxPhase::Active, "running", AgentHealth::Healthy);
    handle.upsert_sandbox(SandboxRow::from_sandbox(&running));
    handle.upsert_sandbox(SandboxRow::from_sandbox(&sandbox(
        "w2",
        SandboxPhase::Active,
        "running",
        AgentHealth::Healthy,
    )));
    handle.flush().await.unwrap();
    let gone = sandbox(
        "w1",
        SandboxPhase::Terminating,
        "terminated",
        AgentHealth::Unknown,
    );
    handle.upsert_sandbox(SandboxRow::from_sandbox(&gone).terminated());
    handle.flush().await.unwrap();
    let s = |v: &str| Some(v.to_string());
    let rows = sql(
        &d.url,
        "SELECT name, status, health_status, ec2_status, instance_id, CAST(current_load AS TEXT), \
         public_ip FROM sandboxes ORDER BY name",
    )
    .await;
    assert_eq!(
        rows,
        vec![
            vec![
                s("w1"),
                s("terminated"),
                s("unknown"),
                s("terminated"),
                s("i-0123456789abcdef0"),
                s("0"),
                None
            ],
            vec![
                s("w2"),
                s("active"),
                s("healthy"),
                s("running"),
                s("i-0123456789abcdef0"),
                s("3"),
                s("34.197.248.80")
            ],
        ]
    );
    // A dashboard's count of what ran, by the seeds' status values.
    let counts = sql(
        &d.url,
        "SELECT status, CAST(COUNT(*) AS TEXT) FROM sandboxes GROUP BY status ORDER BY status",
    )
    .await;
    assert_eq!(
        counts,
        vec![vec![s("active"), s("1")], vec![s("terminated"), s("1")]]
    );
}

/// The window is 2024-01-01 (UTC), 24 hours.
async fn record_known_intervals(handle: &LedgerHandle) {
    // "DDThh:mm:ss" in January 2024; day 00 is the last of December 2023.
    let at = |h: &str| match h.strip_prefix("00T") {
        Some(time) => t(&format!("2023-12-31T{time}Z")),
        None => t(&format!("2024-01-{h}Z")),
    };
    // a: t3.large on-demand. Runs 00-10, auto-stopped (Idle) 10-15, runs 15-20, stopped.
    // 15 h x 0.0832 = 1.248; saved 5 h x 0.0832 = 0.416.
    let a = |running, when| {
        PowerChange::new("i-a", "t3.large", Market::OnDemand, running, at(when))
            .sandbox("fleet", "a")
    };
    handle.record_power(a(true, "01T00:00:00"));
    handle.record_power(a(false, "01T10:00:00").reason(StopReason::Idle));
    handle.record_power(a(true, "01T15:00:00"));
    handle.record_power(a(false, "01T20:00:00").reason(StopReason::Requested));
    // b: t3.medium spot, observed through EC2 states. Runs from the day before until 02, and
    // from 12 on (still running at the end): 2 h + 12 h = 14 h x 0.016 = 0.224.
    let b = |state: &str, when: &str, reason| {
        LedgerEvent::InstanceState(InstanceStateEvent {
            at: at(when),
            instance_id: "i-b".into(),
            sandbox: Some(NamespacedName::new("fleet", "b")),
            instance_type: Some("t3.medium".into()),
            market: Market::Spot,
            state: state.into(),
            stop_reason: reason,
        })
    };
    handle.record(b("running", "00T22:00:00", None));
    handle.record(b("stopping", "01T02:00:00", Some(StopReason::Requested)));
    handle.record(b("stopped", "01T02:01:00", Some(StopReason::Requested)));
    handle.record(b("pending", "01T11:59:00", None));
    handle.record(b("running", "01T12:00:00", None));
    handle.record(b("running", "01T13:00:00", None)); // seen again: no second interval
    // c: t3.xlarge on-demand. Runs 06-08, auto-stopped, terminated at 20 while stopped:
    // 2 h x 0.1664 = 0.3328; saved 12 h (08-20) x 0.1664 = 1.9968.
    let c = |running, when| {
        PowerChange::new("i-c", "t3.xlarge", Market::OnDemand, running, at(when))
            .sandbox("ops", "c")
    };
    handle.record_power(c(true, "01T06:00:00"));
    handle.record_power(c(false, "01T08:00:00").reason(StopReason::Idle));
    handle.record(LedgerEvent::InstanceState(InstanceStateEvent {
        at: at("01T20:00:00"),
        instance_id: "i-c".into(),
        sandbox: Some(NamespacedName::new("ops", "c")),
        instance_type: Some("t3.xlarge".into()),
        market: Market::OnDemand,
        state: "terminated".into(),
        stop_reason: None,
    }));
    // d: no sandbox recorded, an unpriced type: 1 h counted, no cost.
    handle.record_power(PowerChange::new(
        "i-d",
        "m5.large",
        Market::OnDemand,
        true,
        at("01T00:00:00"),
    ));
    handle.record_power(PowerChange::new(
        "i-d",
        "m5.large",
        Market::OnDemand,
        false,
        at("01T01:00:00"),
    ));
    // Outside the window: ignored.
    handle.record_power(a(true, "03T00:00:00"));
}

async fn cost_report_from_known_intervals(db: Db) {
    let d = fresh(db, "cost").await;
    let ledger = Ledger::connect(&d.url).await.unwrap();
    let handle = ledger.spawn_writer(small_writer());
    record_known_intervals(&handle).await;
    handle.flush().await.unwrap();

    let (since, until) = (t("2024-01-01T00:00:00Z"), t("2024-01-02T00:00:00Z"));
    let r = ledger
        .cost_report(since, until, &PriceList::seeds())
        .await
        .unwrap();
    let names: Vec<(&str, &str)> = r
        .sandboxes
        .iter()
        .map(|s| (s.namespace.as_str(), s.name.as_str()))
        .collect();
    assert_eq!(
        names,
        [("", "i-d"), ("fleet", "a"), ("fleet", "b"), ("ops", "c")]
    );
    let by = |name: &str| r.sandboxes.iter().find(|s| s.name == name).unwrap();
    let a = by("a");
    assert_eq!((a.hours, a.cost), (15.0, 1.248));
    assert_eq!((a.idle_stopped_hours, a.saved), (5.0, 0.416));
    let b = by("b");
    assert_eq!((b.hours, b.cost, b.saved), (14.0, 0.224, 0.0));
    assert_eq!(b.lines[0].price_per_hour, Some(0.016));
    let c = by("c");
    assert_eq!((c.hours, c.cost), (2.0, 0.3328));
    assert_eq!((c.idle_stopped_hours, c.saved), (12.0, 1.9968));
    let d_ = by("i-d");
    assert_eq!((d_.hours, d_.cost), (1.0, 0.0));
    assert_eq!(d_.lines[0].cost, None);
    assert_eq!(r.unpriced, vec!["m5.large (on-demand)"]);
    assert_eq!(r.total.hours, 32.0);
    assert_eq!(r.total.cost, 1.8048);
    assert_eq!(r.total.idle_stopped_hours, 17.0);
    assert_eq!(r.total.saved, 2.4128);

    // The intervals as stored.
    let rows = sql(
        &d.url,
        "SELECT instance_id, CAST(COUNT(*) AS TEXT) FROM power_intervals GROUP BY instance_id \
         ORDER BY instance_id",
    )
    .await;
    let counts: Vec<(String, String)> = rows
        .into_iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
        .collect();
    let s = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        counts,
        [s("i-a", "3"), s("i-b", "2"), s("i-c", "2"), s("i-d", "1")],
        "i-c: one run and a zero-length termination mark"
    );

    // The command: JSON, a price file for the unpriced type, and the table.
    let now = t("2024-01-05T00:00:00Z");
    let json = report(
        &[
            "cost",
            "--ledger",
            &d.url,
            "--since",
            "2024-01-01T00:00:00Z",
            "--until",
            "2024-01-02",
            "-o",
            "json",
        ],
        now,
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["total"]["cost"], 1.8048);
    assert_eq!(v["total"]["saved"], 2.4128);
    assert_eq!(v["currency"], "USD");
    assert_eq!(v["sandboxes"][1]["lines"][0]["instance_type"], "t3.large");

    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.yaml");
    std::fs::write(&prices, "prices:\n  m5.large: {on_demand: 0.096}\n").unwrap();
    let json = report(
        &[
            "cost",
            "--ledger",
            &d.url,
            "--since",
            "4d",
            "--until",
            "3d",
            "--prices",
            prices.to_str().unwrap(),
            "--output",
            "json",
        ],
        now,
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["total"]["cost"], 1.9008, "with m5.large at 0.096");
    assert_eq!(v["unpriced"], serde_json::json!([]));

    let table = report(
        &["cost", "--ledger", &d.url, "--since", "4d", "--until", "3d"],
        now,
    )
    .await
    .unwrap();
    assert!(table.starts_with("Cost from 2024-01-01T00:00:00Z to 2024-01-02T00:00:00Z in USD"));
    let total = table.lines().find(|l| l.starts_with("TOTAL")).unwrap();
    let cells: Vec<&str> = total.split_whitespace().collect();
    assert_eq!(cells, ["TOTAL", "32.00", "1.8048", "17.00", "2.4128"]);
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [
                    "fleet",
                    "a",
                    "i-a",
                    "t3.large",
                    "on-demand",
                    "15.00",
                    "0.0832",
                    "1.2480",
                    "5.00",
                    "0.4160"
                ]),
        "{table}"
    );
    assert!(table.contains("No price for m5.large (on-demand)"));
}

async fn fleet_and_deploy_reports(db: Db) {
    let d = fresh(db, "reports").await;
    let ledger = Ledger::connect(&d.url).await.unwrap();
    let handle = ledger.spawn_writer(small_writer());
    handle.upsert_sandbox(SandboxRow::from_sandbox(&sandbox(
        "w1",
        SandboxPhase::Active,
        "running",
        AgentHealth::Healthy,
    )));
    let mut w2 = SandboxRow::new("fleet", "w2", Environment::Prod);
    w2.instance_id = Some("i-00000000000000002".into());
    handle.upsert_sandbox(w2);
    let step =
        |min: i64, env, deploy: Option<&str>, sbx: Option<&str>, tag: &str, step: &str, outcome| {
            LedgerEvent::DeployStep(DeployStepEvent {
                at: t("2024-05-01T10:00:00Z") + SignedDuration::from_mins(min),
                namespace: "fleet".into(),
                deploy: deploy.map(Into::into),
                sandbox: sbx.map(Into::into),
                environment: Some(env),
                tag: tag.into(),
                previous_tag: Some("v1".into()),
                step: step.into(),
                outcome,
                message: None,
            })
        };
    use Environment::*;
    use Outcome::*;
    for e in [
        step(0, Prod, Some("gh-1"), Some("w2"), "v2", "Draining", Started),
        step(
            1,
            Prod,
            Some("gh-1"),
            Some("w2"),
            "v2",
            "Deploying",
            Started,
        ),
        step(
            2,
            Prod,
            Some("gh-1"),
            Some("w2"),
            "v2",
            "Succeeded",
            Succeeded,
        ),
        step(3, Prod, Some("gh-1"), None, "v2", "Succeeded", Succeeded),
        step(5, Staging, None, Some("w1"), "v3", "Deploying", Started),
        step(6, Staging, None, Some("w1"), "v3", "Failed", Failed),
        step(7, Staging, None, Some("w1"), "v3", "RolledBack", Succeeded),
    ] {
        handle.record(e);
    }
    handle.flush().await.unwrap();
    let now = t("2024-05-02T00:00:00Z");

    let table = report(&["fleet", "--ledger", &d.url], now).await.unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("NAMESPACE   NAME   ENVIRONMENT   STATUS"),
        "{table}"
    );
    let w1: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &w1[..12],
        [
            "fleet",
            "w1",
            "staging",
            "active",
            "healthy",
            "running",
            "i-0123456789abcdef0",
            "t3.medium",
            "on-demand",
            "34.197.248.80",
            "adspower",
            "3/5"
        ]
    );
    let json = report(
        &[
            "fleet",
            "--ledger",
            &d.url,
            "-o",
            "json",
            "--environment",
            "prod",
        ],
        now,
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["name"], "w2");
    assert_eq!(v[0]["health_status"], "unknown");
    assert!(
        report(&["fleet", "--ledger", &d.url, "--environment", "qa"], now)
            .await
            .is_err()
    );

    let table = report(&["deploys", "--ledger", &d.url], now).await.unwrap();
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert_eq!(rows[0][0], "ENVIRONMENT");
    assert_eq!(
        rows[1][..9],
        [
            "staging",
            "fleet",
            "sandbox/w1",
            "v3",
            "Failed",
            "1",
            "0",
            "0",
            "1"
        ]
    );
    assert_eq!(
        rows[2][..9],
        [
            "prod",
            "fleet",
            "gh-1",
            "v2",
            "Succeeded",
            "1",
            "1",
            "0",
            "0"
        ]
    );
    let json = report(
        &[
            "deploys",
            "--ledger",
            &d.url,
            "--output",
            "json",
            "--environment",
            "prod",
            "--since",
            "2d",
        ],
        now,
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["environments"].as_array().unwrap().len(), 1);
    let gh1 = &v["environments"][0]["deploys"][0];
    assert_eq!(gh1["deploy"], "gh-1");
    assert_eq!(gh1["phase"], "Succeeded");
    assert_eq!(gh1["sandboxes"][0]["sandbox"], "w2");
    assert_eq!(gh1["finished_at"], "2024-05-01T10:03:00Z");
    // Nothing in the last hour.
    let json = report(
        &["deploys", "--ledger", &d.url, "-o", "json", "--since", "1h"],
        now,
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["environments"], serde_json::json!([]));
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn queue_overflow_is_counted_and_logged(db: Db) {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    // This test runs on one thread, the writer's task included: the subscriber sees both.
    let _guard = tracing::subscriber::set_default(subscriber);

    let d = fresh(db, "overflow").await;
    let ledger = Ledger::connect(&d.url).await.unwrap();
    let handle = ledger.spawn_writer(WriterOptions {
        capacity: 16,
        ..small_writer()
    });
    let mut registry = Registry::with_prefix("sandbox_operator");
    handle.register_metrics(&mut registry);
    // No await in this loop: on this single-threaded runtime the writer cannot run, so the
    // queue takes exactly 16 and the other 84 are lost.
    let events = sample_events();
    for i in 0..100 {
        handle.record(events[i % events.len()].clone());
    }
    assert_eq!(handle.queued(), 16);
    assert_eq!(handle.dropped(), 84);
    handle.flush().await.unwrap();

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("sandbox_operator_ledger_events_dropped_total 84\n"),
        "{text}"
    );
    assert!(
        text.contains("sandbox_operator_ledger_events_written_total 16\n"),
        "{text}"
    );
    let stored = ledger.events(&EventQuery::default()).await.unwrap();
    assert_eq!(stored.len(), 16);
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("ledger queue full: dropping events"),
        "{logs}"
    );
    assert!(
        logs.contains("ledger queue was full: 84 events lost"),
        "{logs}"
    );
}

async fn secret_sync_stores_no_value(db: Db) {
    const CANARY: &str = "canary-7f3e9b2a-do-not-store";
    let d = fresh(db, "secrets").await;
    let ledger = Ledger::connect(&d.url).await.unwrap();
    let handle = ledger.spawn_writer(small_writer());
    // What the SecretBundle controller has: a rendered .env with a value in it. It hands the
    // ledger the hash and the key names; even a `KEY=value` passed by mistake loses its value.
    let rendered = format!("API_KEY={CANARY}\nDATABASE_URL=postgres://u:{CANARY}@db/x\n");
    let hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(rendered.as_bytes()))
    };
    handle.record(SecretSyncEvent {
        at: t("2024-05-01T12:00:00Z"),
        bundle: NamespacedName::new("fleet", "worker-env"),
        target_kind: SecretTargetKind::Sandbox,
        target_name: "w1".into(),
        content_hash: hash.clone(),
        keys: vec![
            format!("DATABASE_URL=postgres://u:{CANARY}@db/x"),
            "API_KEY".into(),
        ],
        outcome: Outcome::Succeeded,
        message: Some("wrote .env, restarted ghosthands".into()),
    });
    handle.flush().await.unwrap();

    let stored = ledger.events(&EventQuery::default()).await.unwrap();
    let LedgerEvent::SecretSync(e) = &stored[0].event else {
        panic!("not a secret sync: {:?}", stored[0]);
    };
    assert_eq!(e.keys, ["API_KEY", "DATABASE_URL"]);
    assert_eq!(e.content_hash, hash);
    // Nowhere in any column.
    let rows = sql(
        &d.url,
        "SELECT CAST(id AS TEXT), event_key, CAST(at AS TEXT), kind, namespace, sandbox, \
         environment, instance_id, action, state, deploy, tag, step, bundle, target_kind, \
         target_name, content_hash, request_id, outcome, message, payload FROM ledger_events",
    )
    .await;
    let all: String = rows
        .iter()
        .flatten()
        .flatten()
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(all.contains("DATABASE_URL") && all.contains("worker-env"));
    assert!(!all.contains(CANARY), "{all}");
    // Nor anywhere in the SQLite files.
    if let Some(dir) = &d.dir {
        ledger.close().await;
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(
                !bytes.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()),
                "the canary is in a ledger file"
            );
        }
    }
}

/// Prints the writer's sustained rate and the cost report's query time; asserts only that every
/// event arrived. `LEDGER_BENCH_EVENTS=1000000` for the figure (default 20000).
async fn writer_bench(db: Db) {
    let events: usize = std::env::var("LEDGER_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let d = fresh(db, "bench").await;
    let ledger = Ledger::connect(&d.url).await.unwrap();
    let handle = ledger.spawn_writer(WriterOptions::default());
    let end = t("2024-02-01T00:00:00Z");
    let spec = Synthetic {
        events,
        sandboxes: (events / 100).clamp(1, 1000),
        end,
        span: SignedDuration::from_hours(24 * 30),
    };
    let result = bench_writer(&handle, spec).await.unwrap();
    assert_eq!(handle.dropped(), 0);
    assert_eq!(handle.metrics().written.get(), events as u64);

    let started = Instant::now();
    let cost = ledger
        .cost_report(
            end - SignedDuration::from_hours(24 * 30),
            end,
            &PriceList::seeds(),
        )
        .await
        .unwrap();
    let cost_time = started.elapsed();
    let started = Instant::now();
    let deploys = ledger.deploy_history(None, None, 50).await.unwrap();
    let deploys_time = started.elapsed();
    let intervals = sql(&d.url, "SELECT CAST(COUNT(*) AS TEXT) FROM power_intervals").await;
    println!(
        "ledger bench [{db:?}]: {} events in {:.2} s = {:.0} events/s; {} power intervals; \
         cost report ({} sandboxes, total {:.2} h, ${:.2}) in {:.1} ms; deploy history \
         ({} environments) in {:.1} ms",
        result.events,
        result.elapsed.as_secs_f64(),
        result.per_second(),
        intervals[0][0].as_deref().unwrap_or("?"),
        cost.sandboxes.len(),
        cost.total.hours,
        cost.total.cost,
        cost_time.as_secs_f64() * 1e3,
        deploys.environments.len(),
        deploys_time.as_secs_f64() * 1e3,
    );
}

// ---------------------------------------------------------------------------------------------
// The outage: PostgreSQL stops, events keep coming, PostgreSQL returns, every event is there.

fn numbered(i: usize) -> LedgerEvent {
    LedgerEvent::Ec2Action(Ec2ActionEvent {
        at: t("2024-05-01T00:00:00Z") + SignedDuration::from_secs(i as i64),
        action: "DescribeInstances".into(),
        instance_id: None,
        sandbox: None,
        outcome: Outcome::Succeeded,
        error_code: None,
        message: Some(format!("n={i}")),
        request_id: None,
    })
}

fn number(e: &StoredEvent) -> (String, usize) {
    let LedgerEvent::Ec2Action(a) = &e.event else {
        panic!("unexpected {e:?}")
    };
    let m = a.message.as_deref().unwrap();
    let (prefix, n) = m.split_once('=').unwrap();
    (prefix.to_string(), n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_postgres() {
    let server = Arc::new(
        tokio::task::spawn_blocking(PostgresServer::init)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("starting PostgreSQL: {e}")),
    );
    let url = server.url();
    let ledger = Ledger::connect(&url).await.unwrap();
    let handle = ledger.spawn_writer(small_writer());
    for i in 0..10 {
        handle.record(numbered(i));
    }
    handle.flush_within(Duration::from_secs(30)).await.unwrap();

    let s = server.clone();
    tokio::task::spawn_blocking(move || s.stop()).await.unwrap();
    assert!(!server.is_running());
    // While it is down: 500 more events (a reconcile's record never waits), and a second writer
    // started without a database (the operator's start-up does not wait for one either).
    let started = Instant::now();
    for i in 10..510 {
        handle.record(numbered(i));
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "record waited"
    );
    let late = LedgerHandle::spawn(&url, small_writer()).unwrap();
    for i in 0..5 {
        late.record(LedgerEvent::Ec2Action(Ec2ActionEvent {
            message: Some(format!("late={i}")),
            ..match numbered(i) {
                LedgerEvent::Ec2Action(a) => a,
                _ => unreachable!(),
            }
        }));
    }
    // The writer is failing and retrying; a flush cannot finish.
    let deadline = Instant::now() + Duration::from_secs(30);
    while handle.metrics().write_errors.get() < 2 {
        assert!(
            Instant::now() < deadline,
            "the writer never noticed the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        handle.flush_within(Duration::from_millis(300)).await,
        Err(LedgerError::FlushTimeout(_))
    ));

    let s = server.clone();
    tokio::task::spawn_blocking(move || s.start())
        .await
        .unwrap()
        .unwrap();
    handle.flush_within(Duration::from_secs(60)).await.unwrap();
    late.flush_within(Duration::from_secs(60)).await.unwrap();

    let stored = ledger.events(&EventQuery::default()).await.unwrap();
    let main: Vec<usize> = stored
        .iter()
        .map(number)
        .filter(|(p, _)| p == "n")
        .map(|(_, n)| n)
        .collect();
    assert_eq!(
        main,
        (0..510).collect::<Vec<_>>(),
        "every event, once, in order"
    );
    let late_n: Vec<usize> = stored
        .iter()
        .map(number)
        .filter(|(p, _)| p == "late")
        .map(|(_, n)| n)
        .collect();
    assert_eq!(late_n, (0..5).collect::<Vec<_>>());
    assert_eq!(handle.dropped() + late.dropped(), 0);
    ledger.close().await;
    drop(late);
    server.shutdown();
}
