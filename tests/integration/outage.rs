//! The operator across an API server outage. This test has a control plane of its own: it kills
//! that control plane's kube-apiserver under a running `sandbox-operator run` and starts it
//! again (same port, same etcd), which the shared control plane's other users must never see.

use std::process::Command;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use sandbox_operator::api::Sandbox;
use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions};
use sandbox_operator::testenv::{ControlPlane, ControlPlaneOptions};

use crate::support;

/// How long the API server stays down: long enough that kube-runtime's default watcher backoff
/// (0.8 s doubling to 30 s, each delay stretched by up to itself) has grown to 6-25 s delays.
const OUTAGE: Duration = Duration::from_secs(20);

/// From the API server's return (`/readyz` OK) to a new Sandbox carrying a status. The margin:
/// - the tuned schedule: a watch's next attempt is at most 1.25 s after the return; the
///   restarted server answers a watch from the old resourceVersion with 410 Gone (its watch
///   cache starts after it; the server may hold that answer a few seconds while the cache
///   warms up), and the re-list waits at most 1.25 s more. Measured: 5-6 s in all, the list,
///   the reconcile (one EC2 call) and the status write included.
/// - the default schedule cannot: after 20 s of errors it has made at least four attempts, so
///   the delay after the 410 is at least 12.8 s (0.8 s doubled four times), before the re-list,
///   whatever its jitter.
///
/// The log check below proves the schedule itself, independent of timing.
const DEADLINE: Duration = Duration::from_secs(12);

/// The longest delay the tuned schedule may log (its cap and a quarter of jitter).
const LONGEST_BACKOFF: Duration = Duration::from_millis(1250);

/// `sandbox-operator run` against a given kubeconfig, killed when dropped.
struct Op {
    child: std::process::Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Op {
    fn start(kubeconfig: &std::path::Path, namespace: &str, ec2_url: &str) -> Op {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("operator.log");
        let port = sandbox_operator::testenv::free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandbox-operator"));
        cmd.arg("run")
            .args(["--namespace", namespace, "--ec2-endpoint", ec2_url])
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .args(["--ec2-refresh", "1s", "--ec2-batch-window", "50ms"])
            .args([
                "--poll",
                "500ms",
                "--resync",
                "20s",
                "--region",
                "us-east-1",
            ])
            .args(["--orphan-grace", "off", "--ledger", "off"])
            .env("KUBECONFIG", kubeconfig)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            // kube-runtime logs every backoff it takes ("Error received, backing off") at debug.
            .env(
                "SANDBOX_OPERATOR_LOG",
                "info,sandbox_operator=debug,kube_runtime::utils::stream_backoff=debug,kube_runtime::watcher=debug",
            )
            .env("SANDBOX_OPERATOR_LOG_FORMAT", "json");
        let child = sandbox_operator::testenv::process::spawn_tied(cmd, &log)
            .expect("starting sandbox-operator");
        Op {
            child,
            log,
            _dir: dir,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- sandbox-operator log ----\n{}", self.logs());
        }
    }
}

/// A `Duration`'s `Debug` text ("250ms", "2.1234s", "900µs") as a duration.
fn parse_debug_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("µs") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ns") {
        (n, 1e-9)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        return None;
    };
    num.parse::<f64>()
        .ok()
        .map(|n| Duration::from_secs_f64(n * scale))
}

/// Every delay kube-runtime logged backing off a stream after an error.
fn backoffs(log: &str) -> Vec<Duration> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "Error received, backing off")
        .filter_map(|v| {
            v["fields"]["duration"]
                .as_str()
                .and_then(parse_debug_duration)
        })
        .collect()
}

async fn launched(sbx: &Api<Sandbox>, name: &str, ami: &str) {
    let obj = serde_json::json!({
        "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "Sandbox",
        "metadata": {"name": name},
        "spec": {"environment": "staging", "instanceType": "t3.large", "launch": {"imageId": ami}},
    });
    sbx.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap_or_else(|e| panic!("applying Sandbox {name}: {e}"));
}

/// Polls until the Sandbox carries a status for its generation, or `deadline` passes.
async fn status_within(sbx: &Api<Sandbox>, name: &str, deadline: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < deadline {
        if let Ok(s) = sbx.get(name).await
            && s.status
                .as_ref()
                .is_some_and(|st| st.observed_generation.is_some())
        {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[test]
fn debug_durations_parse() {
    assert_eq!(
        parse_debug_duration("250ms"),
        Some(Duration::from_millis(250))
    );
    assert_eq!(
        parse_debug_duration("2.5s"),
        Some(Duration::from_millis(2500))
    );
    assert_eq!(
        parse_debug_duration("900µs"),
        Some(Duration::from_micros(900))
    );
    assert_eq!(parse_debug_duration("soon"), None);
}

#[tokio::test]
async fn watches_resume_within_seconds_of_the_api_servers_return() {
    sandbox_operator::util::install_crypto_provider();
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .unwrap_or_else(|e| panic!("starting the dedicated control plane: {e}"));
    let client = cp.client().await.unwrap();
    let ns = support::namespace(&client, "outage").await;
    let ec2 = Ec2Endpoint::start(Ec2EndpointOptions::default())
        .await
        .expect("EC2 endpoint");
    let ami = ec2.defaults().await.unwrap().ami;
    let op = Op::start(cp.kubeconfig_path(), &ns, &ec2.url());
    let sbx: Api<Sandbox> = Api::namespaced(client.clone(), &ns);

    // The operator is up and watching: a Sandbox gets its status.
    launched(&sbx, "before", &ami).await;
    assert!(
        status_within(&sbx, "before", Duration::from_secs(90))
            .await
            .is_some(),
        "the operator never wrote a status before the outage"
    );
    let before = backoffs(&op.logs()).len();

    // The outage.
    cp.stop_apiserver();
    let down = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    cp.start_apiserver()
        .await
        .unwrap_or_else(|e| panic!("starting kube-apiserver again: {e}"));
    let outage = down.elapsed();

    // Back: a new Sandbox is seen (the watch resumed) and reconciled.
    let client = cp.client().await.unwrap();
    let sbx: Api<Sandbox> = Api::namespaced(client, &ns);
    launched(&sbx, "after", &ami).await;
    let took = status_within(&sbx, "after", DEADLINE).await;
    println!(
        "FIGURE API server down {:.1} s (killed {} s, then start-up); a Sandbox created on its return has a status after {}",
        outage.as_secs_f64(),
        OUTAGE.as_secs(),
        took.map_or("more than the deadline".to_string(), |d| format!(
            "{:.1} s",
            d.as_secs_f64()
        ))
    );

    // Every watch backed off during the outage, never longer than the tuned schedule's cap.
    let log = op.logs();
    let during = backoffs(&log);
    let during = &during[before.min(during.len())..];
    assert!(
        during.len() >= 5,
        "the outage logged almost no backoff ({during:?}): is the log filter right?"
    );
    let longest = during.iter().max().copied().unwrap_or_default();
    assert!(
        longest <= LONGEST_BACKOFF,
        "a watch backed off {longest:?} (more than {LONGEST_BACKOFF:?}): {during:?}"
    );
    assert!(
        took.is_some(),
        "the Sandbox created after the API server's return had no status within {DEADLINE:?}"
    );
}
