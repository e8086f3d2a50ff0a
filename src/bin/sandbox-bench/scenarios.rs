//! The scenarios themselves.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::agents::AgentFarm;
use crate::config::Config;
use crate::fleet::{self, FLEET_LABEL, FleetWatch, Source};
use crate::operator::{OperatorProc, names};
use crate::report::{Results, Verdict, quantile};
use sandbox_operator::api::{Sandbox, SandboxDeploy};
use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions, ThrottleConfig};
use sandbox_operator::testenv::{ControlPlane, ControlPlaneOptions};

#[path = "pool.rs"]
mod pool;

const FIELD_MANAGER: &str = "sandbox-bench";
const INITIAL_TAG: &str = "v1";

struct Env {
    cfg: Config,
    cp: ControlPlane,
    client: Client,
    farm: AgentFarm,
    token: String,
    dir: PathBuf,
    http: reqwest::Client,
}

/// A fleet under one operator, against its own endpoint.
struct Fleet {
    label: String,
    ns: String,
    ec2: Ec2Endpoint,
    op: OperatorProc,
    watch: FleetWatch,
    names: Vec<String>,
    /// `--ec2-refresh` of its operator.
    refresh: Duration,
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn sandbox_name(i: usize) -> String {
    format!("sbx-{i:05}")
}

/// The operator's flags for a scenario: its defaults, except what `extra` says.
fn operator_flags(extra: &[(&str, &str)]) -> Vec<String> {
    let mut v = Vec::new();
    for (k, val) in extra {
        v.push(format!("--{k}"));
        v.push((*val).to_owned());
    }
    v
}

pub async fn run(cfg: Config) -> Result<Results, String> {
    let started = Instant::now();
    let dir = cfg
        .out
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    sandbox_operator::util::install_crypto_provider();
    eprintln!("[bench] starting the control plane");
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .map_err(|e| format!("starting the control plane: {e}"))?;
    let client = cp
        .client()
        .await
        .map_err(|e| format!("control plane client: {e}"))?;
    let token = format!("bench-token-{}", std::process::id());
    let farm = AgentFarm::start(INITIAL_TAG, Some(token.clone()))
        .await
        .map_err(|e| format!("starting the virtual agents: {e}"))?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| e.to_string())?;
    eprintln!(
        "[bench] control plane up in {:.1} s; operator {}",
        cp.startup.as_secs_f64(),
        cfg.operator_bin.display()
    );
    let env = Env {
        cfg: cfg.clone(),
        cp,
        client,
        farm,
        token,
        dir,
        http,
    };
    let mut res = Results::comparing(cfg.previous.clone());
    res.detail(
        "run",
        json!({
            "mode": if cfg.quick { "quick" } else { "full" },
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "memTotalKiB": mem_total_kib(),
            "startedAt": jiff::Timestamp::now().to_string(),
            "operatorBinary": cfg.operator_bin.display().to_string(),
            "convergeSizes": cfg.converge_sizes,
            "steadySize": cfg.steady_size,
            "steadyWindowS": cfg.steady_window.as_secs_f64(),
            "settleS": cfg.settle.as_secs_f64(),
            "changes": cfg.changes,
            "maxUnavailable": cfg.max_unavailable,
            "deployTimeS": cfg.deploy_time.as_secs_f64(),
            "memorySizes": cfg.memory_sizes,
            "transitionsS": cfg.transitions.as_secs_f64(),
            "fleetProbeInterval": cfg.fleet_probe_interval,
        }),
    );
    let mut broken = false;

    // ---- first status: how soon a large fleet shows any status at all ----
    if cfg.wants("first-status") {
        let n = cfg.first_status_size;
        eprintln!(
            "[bench] first-status-{n}: {n} Sandboxes with spec.launch, applied at once; time until each shows a phase and Ready"
        );
        if let Err(e) = first_status(&env, &mut res, n).await {
            broken = true;
            res.row(
                &format!("first-status-{n}"),
                "scenario",
                "error",
                None,
                "",
                Verdict::NotRun,
                e,
            );
        }
        write(&env, &res, started);
    }

    // ---- 1-4: the launched fleets ----
    let mut first: Option<Fleet> = None;
    let wants_first_fleet = cfg.wants("converge")
        || cfg.wants("steady")
        || cfg.wants("reaction")
        || cfg.wants("rollout");
    for (k, &n) in cfg.converge_sizes.iter().enumerate() {
        if k > 0 && !cfg.wants("converge") {
            break;
        }
        if k == 0 && !wants_first_fleet {
            continue;
        }
        let label = format!("converge-{n}");
        eprintln!("[bench] {label}: {n} Sandboxes with spec.launch, applied at once");
        match converge(&env, &mut res, n).await {
            Ok(fleet) => {
                if k == 0 {
                    first = Some(fleet);
                }
            }
            Err(e) => {
                broken = true;
                res.row(&label, "scenario", "error", None, "", Verdict::NotRun, e);
            }
        }
        write(&env, &res, started);
    }
    if let Some(fleet) = first.as_ref() {
        if cfg.wants("steady") {
            eprintln!(
                "[bench] steady-{}: the converged fleet, quiet, for {} s",
                fleet.names.len(),
                cfg.steady_window.as_secs()
            );
            if let Err(e) = steady(&env, &mut res, fleet, false).await {
                broken = true;
                res.row(
                    &format!("steady-{}", fleet.names.len()),
                    "scenario",
                    "error",
                    None,
                    "",
                    Verdict::NotRun,
                    e,
                );
            }
            write(&env, &res, started);
        }
        if cfg.wants("reaction") {
            eprintln!("[bench] reaction: {} powerState flips", cfg.changes);
            if let Err(e) = reaction(&env, &mut res, fleet).await {
                broken = true;
                res.row(
                    "reaction",
                    "scenario",
                    "error",
                    None,
                    "",
                    Verdict::NotRun,
                    e,
                );
            }
            write(&env, &res, started);
        }
        if cfg.wants("rollout") {
            eprintln!(
                "[bench] rollout: {} sandboxes, maxUnavailable {}, {} s per deploy",
                fleet.names.len(),
                cfg.max_unavailable,
                cfg.deploy_time.as_secs_f64()
            );
            if let Err(e) = rollout(&env, &mut res, fleet).await {
                broken = true;
                res.row("rollout", "scenario", "error", None, "", Verdict::NotRun, e);
            }
            write(&env, &res, started);
        }
    }
    drop(first);

    // ---- steady state at scale ----
    if cfg.wants("steady") {
        eprintln!(
            "[bench] steady-{}: adopted running instances, quiet, for {} s",
            cfg.steady_size,
            cfg.steady_window.as_secs()
        );
        if let Err(e) = steady_large(&env, &mut res).await {
            broken = true;
            res.row(
                &format!("steady-{}", cfg.steady_size),
                "scenario",
                "error",
                None,
                "",
                Verdict::NotRun,
                e,
            );
        }
        write(&env, &res, started);
    }

    // ---- memory ----
    if cfg.wants("memory") {
        eprintln!(
            "[bench] memory: {:?} ObserveOnly Sandboxes",
            cfg.memory_sizes
        );
        if let Err(e) = memory(&env, &mut res).await {
            broken = true;
            res.row("memory", "scenario", "error", None, "", Verdict::NotRun, e);
        }
        write(&env, &res, started);
    }

    // ---- SandboxPool: scale 0 -> N and the standby's advantage ----
    if cfg.wants("pool") {
        eprintln!(
            "[bench] pool-{}: a SandboxPool scaled 0 -> {} through its scale subresource; then standby start vs launch",
            cfg.pool_size, cfg.pool_size
        );
        if let Err(e) = pool::pool(&env, &mut res).await {
            broken = true;
            res.row(
                &format!("pool-{}", cfg.pool_size),
                "scenario",
                "error",
                None,
                "",
                Verdict::NotRun,
                e,
            );
        }
        write(&env, &res, started);
    }

    res.detail(
        "duration",
        json!({"seconds": started.elapsed().as_secs_f64()}),
    );
    write(&env, &res, started);
    env.cp.shutdown();
    if broken {
        res.detail("incomplete", json!(true));
    }
    Ok(res)
}

fn mem_total_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn write(env: &Env, res: &Results, started: Instant) {
    let mut value = serde_json::to_value(res).unwrap_or(Value::Null);
    value["elapsedSeconds"] = json!(started.elapsed().as_secs_f64());
    let text = serde_json::to_string_pretty(&value).unwrap_or_default();
    if let Err(e) = std::fs::write(&env.cfg.out, text) {
        eprintln!("[bench] writing {}: {e}", env.cfg.out.display());
    }
}

impl Env {
    async fn endpoint(&self, label: &str) -> Result<Ec2Endpoint, String> {
        Ec2Endpoint::start(Ec2EndpointOptions {
            throttle: true,
            log_file: Some(self.dir.join(format!("{label}-ec2.log"))),
            ..Ec2EndpointOptions::default().with_transitions(self.cfg.transitions)
        })
        .await
        .map_err(|e| format!("starting the EC2 endpoint: {e}"))
    }

    async fn operator(
        &self,
        label: &str,
        ns: &str,
        ec2: &Ec2Endpoint,
        flags: &[String],
    ) -> Result<OperatorProc, String> {
        OperatorProc::start(
            &self.cfg.operator_bin,
            self.cp.kubeconfig_path(),
            ns,
            &ec2.url(),
            flags,
            self.dir.join(format!("{label}-operator.log")),
        )
        .await
    }

    async fn namespace(&self, ns: &str) -> Result<(), String> {
        fleet::namespace(&self.client, ns).await?;
        fleet::token_secret(&self.client, ns, &self.token).await
    }

    /// The endpoint's bucket settings: name -> (capacity, refill per second).
    async fn buckets(&self, ec2: &Ec2Endpoint) -> Result<BTreeMap<String, (f64, f64)>, String> {
        let v: Value = self
            .http
            .get(format!("{}/_endpoint/throttle", ec2.url()))
            .send()
            .await
            .map_err(|e| format!("reading the endpoint's buckets: {e}"))?
            .json()
            .await
            .map_err(|e| format!("reading the endpoint's buckets: {e}"))?;
        let mut out = BTreeMap::new();
        if let Some(b) = v["buckets"].as_object() {
            for (name, spec) in b {
                out.insert(
                    name.clone(),
                    (
                        spec["capacity"].as_f64().unwrap_or(0.0),
                        spec["refill_per_second"].as_f64().unwrap_or(0.0),
                    ),
                );
            }
        }
        Ok(out)
    }

    /// Launches `n` running instances directly (throttling off meanwhile, then on again with
    /// full buckets), and zeroes the endpoint's counts. Returns their ids.
    async fn precreate(&self, ec2: &Ec2Endpoint, n: usize) -> Result<Vec<String>, String> {
        let ami = ec2.defaults().await.map_err(|e| e.to_string())?.ami;
        ec2.set_throttle(ThrottleConfig::disabled())
            .await
            .map_err(|e| e.to_string())?;
        let sdk = ec2.client().await;
        let mut ids = Vec::with_capacity(n);
        let started = Instant::now();
        while ids.len() < n {
            let batch = (n - ids.len()).min(1000) as i32;
            let out = sdk
                .run_instances()
                .image_id(&ami)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Large)
                .min_count(batch)
                .max_count(batch)
                .send()
                .await
                .map_err(|e| format!("pre-creating instances: {e:?}"))?;
            ids.extend(
                out.instances()
                    .iter()
                    .filter_map(|i| i.instance_id().map(str::to_owned)),
            );
        }
        eprintln!(
            "[bench]   {} instances created at the endpoint in {:.1} s",
            ids.len(),
            started.elapsed().as_secs_f64()
        );
        // Past the pending state before the operator looks.
        tokio::time::sleep(self.cfg.transitions + Duration::from_millis(200)).await;
        ec2.set_throttle(ThrottleConfig::enabled())
            .await
            .map_err(|e| e.to_string())?;
        ec2.reset_calls().await.map_err(|e| e.to_string())?;
        Ok(ids)
    }
}

// ------------------------------------------------------------------------------------------
// converge
// ------------------------------------------------------------------------------------------

async fn converge(env: &Env, res: &mut Results, n: usize) -> Result<Fleet, String> {
    let label = format!("converge-{n}");
    let ns = format!("bench-{label}");
    let ec2 = env.endpoint(&label).await?;
    let ami = ec2.defaults().await.map_err(|e| e.to_string())?.ami;
    env.namespace(&ns).await?;
    let flags = operator_flags(&[]);
    let op = env.operator(&label, &ns, &ec2, &flags).await?;
    let watch = FleetWatch::start(&env.client, &ns);
    let names: Vec<String> = (0..n).map(sandbox_name).collect();
    let objects: Vec<Sandbox> = names
        .iter()
        .map(|name| {
            fleet::manifest(
                name,
                &label,
                &Source::Launch { ami: ami.clone() },
                &env.farm.url(&format!("{label}-{name}")),
                Some(&env.cfg.fleet_probe_interval),
            )
        })
        .collect();
    ec2.reset_calls().await.map_err(|e| e.to_string())?;
    let m0 = op.metrics().await?;
    let buckets = env.buckets(&ec2).await?;
    let (run_c, run_r) = buckets
        .get(sandbox_operator::testenv::ec2::bucket::RUN_INSTANCES)
        .copied()
        .unwrap_or((5.0, 2.0));
    let min_bound = ((n as f64 - run_c) / run_r).max(0.0);
    let t0 = Instant::now();
    let applied = fleet::create_all(&env.client, &ns, objects, 32).await?;
    eprintln!(
        "[bench]   applied {n} in {:.1} s; the request buckets allow it in no less than {:.1} s",
        applied.as_secs_f64(),
        min_bound
    );
    let timeout = Duration::from_secs_f64((min_bound * 4.0).max(300.0));
    let progress = |m: &HashMap<String, fleet::Seen>| {
        format!(
            "{}/{} seen, {} Ready, {} ever failed",
            m.len(),
            n,
            m.values().filter(|s| s.ready).count(),
            m.values().filter(|s| s.ever_failed).count()
        )
    };
    let reporter = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            eprintln!("[bench]   ... {:.0} s", t0.elapsed().as_secs_f64());
        }
    });
    let waited = watch
        .wait(
            timeout,
            |m| m.len() == n && m.values().all(|s| s.ready),
            progress,
        )
        .await;
    reporter.abort();
    let converge_time = match &waited {
        Ok(_) => watch.with(|m| {
            m.values()
                .filter_map(|s| s.ready_at)
                .max()
                .map(|t| t.duration_since(t0))
        }),
        Err(_) => None,
    };
    let (_, ready, ever_failed) = watch.ready_and_failed();
    let failures: Vec<String> = watch.with(|m| {
        m.iter()
            .filter_map(|(k, s)| s.failure.as_ref().map(|f| format!("{k}: {f}")))
            .take(10)
            .collect()
    });
    let calls = ec2.calls().await.map_err(|e| e.to_string())?;
    let log = ec2.call_log(0.0).await.map_err(|e| e.to_string())?;
    let m1 = op.metrics().await?;

    // Bounds: what each bucket allows for the calls that passed through it.
    let resource_bucket = |action: &str| match action {
        "RunInstances" => Some("run_instances_resources"),
        "StartInstances" => Some("start_instances_resources"),
        "StopInstances" => Some("stop_instances_resources"),
        "TerminateInstances" => Some("terminate_instances_resources"),
        _ => None,
    };
    let mut drawn: BTreeMap<String, f64> = BTreeMap::new();
    for e in log.iter().filter(|e| e.outcome == "accepted") {
        *drawn.entry(e.bucket.clone()).or_default() += 1.0;
        if let Some(rb) = resource_bucket(&e.action) {
            let tokens = if e.action == "RunInstances" {
                1.0
            } else {
                e.n.max(1) as f64
            };
            *drawn.entry(rb.to_owned()).or_default() += tokens;
        }
    }
    let mut bound = min_bound;
    let mut binding = format!(
        "{n} RunInstances through run_instances ({run_c:.0} + {run_r:.0}/s): ({n} - {run_c:.0}) / {run_r:.0}"
    );
    let mut per_bucket = serde_json::Map::new();
    for (b, used) in &drawn {
        let (c, r) = buckets.get(b).copied().unwrap_or((f64::INFINITY, 1.0));
        let t = if r > 0.0 {
            ((used - c) / r).max(0.0)
        } else {
            0.0
        };
        per_bucket.insert(
            b.clone(),
            json!({"tokens": used, "capacity": c, "refillPerSecond": r, "boundSeconds": t}),
        );
        if t > bound {
            bound = t;
            binding = format!("{used:.0} tokens from {b} ({c:.0} + {r:.0}/s)");
        }
    }
    let client_limits = sandbox_operator::ec2::RateLimits::default();
    let client_bound =
        ((n as f64 - client_limits.run.capacity) / client_limits.run.refill_per_second).max(0.0);

    // Calls per action.
    let op_calls = m1.by(names::EC2_CALLS, &["action", "outcome"]);
    let op_calls0 = m0.by(names::EC2_CALLS, &["action", "outcome"]);
    let op_delta = |action: &str, outcome: &str| {
        let k = format!("{action}/{outcome}");
        op_calls.get(&k).copied().unwrap_or(0.0) - op_calls0.get(&k).copied().unwrap_or(0.0)
    };
    let mut actions: Vec<String> = calls
        .calls
        .keys()
        .chain(calls.throttled.keys())
        .cloned()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    actions.sort();
    let errors = m1.by(names::RECONCILE_ERRORS, &["error"]);
    let errors0 = m0.by(names::RECONCILE_ERRORS, &["error"]);
    let error_delta: BTreeMap<String, f64> = errors
        .iter()
        .map(|(k, v)| (k.clone(), v - errors0.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    let moto_ms: f64 = log.iter().map(|e| e.moto_ms).sum();

    match converge_time {
        Some(t) => res.row(
            &label,
            "time until all Ready",
            secs(t),
            Some(t.as_secs_f64()),
            "",
            Verdict::Info,
            format!("{n} applied in {:.1} s", applied.as_secs_f64()),
        ),
        None => res.row(
            &label,
            "time until all Ready",
            format!("> {} s", timeout.as_secs()),
            None,
            "",
            Verdict::Missed,
            format!("{ready}/{n} Ready when the bench gave up"),
        ),
    }
    res.row(
        &label,
        "bound set by the request buckets",
        secs(Duration::from_secs_f64(bound)),
        Some(bound),
        "",
        Verdict::Info,
        binding.clone(),
    );
    if let Some(t) = converge_time {
        let ratio = t.as_secs_f64() / bound.max(0.001);
        res.row(
            &label,
            "ratio to the bound",
            format!("{ratio:.2}x"),
            Some(ratio),
            "<= 1.2x",
            Verdict::of(ratio <= 1.2),
            format!(
                "the operator's own RunInstances bucket ({:.0} + {:.1}/s) alone takes {:.1} s = {:.2}x",
                client_limits.run.capacity,
                client_limits.run.refill_per_second,
                client_bound,
                client_bound / bound.max(0.001)
            ),
        );
    }
    res.row(
        &label,
        "objects that ever showed a failure",
        ever_failed.to_string(),
        Some(ever_failed as f64),
        "0",
        Verdict::of(ever_failed == 0),
        failures.join("; "),
    );
    for a in &actions {
        res.row(
            &label,
            &format!("EC2 {a}"),
            format!(
                "{} + {} thr",
                calls.accepted(a),
                calls.throttled(a)
            ),
            Some(calls.accepted(a) as f64),
            "",
            Verdict::Info,
            format!(
                "endpoint accepted + throttled; operator's metrics ok/throttled/error {:.0}/{:.0}/{:.0}",
                op_delta(a, "ok"),
                op_delta(a, "throttled"),
                op_delta(a, "error")
            ),
        );
    }
    if !error_delta.is_empty() {
        res.row(
            &label,
            "reconcile errors (requeued)",
            format!("{:.0}", error_delta.values().sum::<f64>()),
            Some(error_delta.values().sum()),
            "",
            Verdict::Info,
            error_delta
                .iter()
                .map(|(k, v)| format!("{k} {v:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    res.detail(
        &label,
        json!({
            "n": n,
            "applySeconds": applied.as_secs_f64(),
            "convergeSeconds": converge_time.map(|t| t.as_secs_f64()),
            "ready": ready,
            "everFailed": ever_failed,
            "failures": failures,
            "boundSeconds": bound,
            "boundFromRunInstances": min_bound,
            "binding": binding.clone(),
            "buckets": per_bucket,
            "operatorRunBucketBoundSeconds": client_bound,
            "endpointCalls": {"accepted": calls.calls, "throttled": calls.throttled, "faulted": calls.faulted},
            "operatorCalls": op_calls.iter().map(|(k, v)| (k.clone(), v - op_calls0.get(k).copied().unwrap_or(0.0))).collect::<BTreeMap<_, _>>(),
            "reconcileErrors": error_delta,
            "motoSecondsTotal": moto_ms / 1000.0,
            "operatorFlags": op.args,
        }),
    );
    Ok(Fleet {
        label,
        ns,
        ec2,
        op,
        watch,
        names,
        refresh: Duration::from_secs(30),
    })
}

// ------------------------------------------------------------------------------------------
// first status
// ------------------------------------------------------------------------------------------

/// `n` Sandboxes with `spec.launch` applied at once against an endpoint with AWS's buckets and
/// the operator's default pacing: seconds until every one carries a phase, a Ready condition
/// and its observedGeneration (the status `kubectl wait`, Argo CD and Flux read), and how many
/// were launched by then.
async fn first_status(env: &Env, res: &mut Results, n: usize) -> Result<(), String> {
    let label = format!("first-status-{n}");
    let ns = format!("bench-{label}");
    let ec2 = env.endpoint(&label).await?;
    let ami = ec2.defaults().await.map_err(|e| e.to_string())?.ami;
    env.namespace(&ns).await?;
    let op = env
        .operator(&label, &ns, &ec2, &operator_flags(&[]))
        .await?;
    let watch = FleetWatch::start(&env.client, &ns);
    let objects: Vec<Sandbox> = (0..n)
        .map(|i| {
            let name = sandbox_name(i);
            fleet::manifest(
                &name,
                &label,
                &Source::Launch { ami: ami.clone() },
                &env.farm.url(&format!("{label}-{name}")),
                Some(&env.cfg.fleet_probe_interval),
            )
        })
        .collect();
    ec2.reset_calls().await.map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let applied = fleet::create_all(&env.client, &ns, objects, 32).await?;
    eprintln!("[bench]   applied {n} in {:.1} s", applied.as_secs_f64());
    let waited = watch
        .wait(
            Duration::from_secs(300),
            |m| m.len() == n && m.values().all(|s| s.status_at.is_some()),
            |m| {
                format!(
                    "{}/{n} seen, {} with a status",
                    m.len(),
                    m.values().filter(|s| s.status_at.is_some()).count()
                )
            },
        )
        .await;
    let launched = ec2
        .calls()
        .await
        .map(|c| c.accepted("RunInstances"))
        .unwrap_or(0);
    let (last, reasons) = watch.with(|m| {
        let last = m
            .values()
            .filter_map(|s| s.status_at)
            .max()
            .map(|t| t.duration_since(t0));
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for s in m.values() {
            *reasons
                .entry(s.ready_reason.clone().unwrap_or_else(|| "(none)".into()))
                .or_default() += 1;
        }
        (last, reasons)
    });
    let reasons_text = reasons
        .iter()
        .map(|(r, k)| format!("{r} {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    match (&waited, last) {
        (Ok(_), Some(t)) => res.row(
            &label,
            "seconds until all show a phase and Ready",
            secs(t),
            Some(t.as_secs_f64()),
            "<= 10 s",
            Verdict::of(t.as_secs_f64() <= 10.0),
            format!(
                "from the start of applying {n} ({:.1} s to apply); {launched} launched by then; Ready reasons then: {reasons_text}",
                applied.as_secs_f64()
            ),
        ),
        _ => res.row(
            &label,
            "seconds until all show a phase and Ready",
            "> 300 s",
            None,
            "<= 10 s",
            Verdict::Missed,
            format!(
                "{}; {launched} launched; Ready reasons: {reasons_text}",
                waited.as_ref().err().cloned().unwrap_or_default()
            ),
        ),
    }
    res.detail(
        &label,
        json!({
            "n": n,
            "applySeconds": applied.as_secs_f64(),
            "allStatusSeconds": last.map(|t| t.as_secs_f64()),
            "launchedByThen": launched,
            "readyReasons": reasons,
            "operatorFlags": op.args,
        }),
    );
    drop(watch);
    drop(op);
    Ok(())
}

// ------------------------------------------------------------------------------------------
// steady
// ------------------------------------------------------------------------------------------

async fn steady(env: &Env, res: &mut Results, f: &Fleet, large: bool) -> Result<(), String> {
    let n = f.names.len();
    let label = format!("steady-{n}");
    tokio::time::sleep(env.cfg.settle).await;
    let window = env.cfg.steady_window;
    let c0 = f.ec2.calls().await.map_err(|e| e.to_string())?;
    let m0 = f.op.metrics().await?;
    let cpu0 = f.op.cpu_time().ok_or("no /proc stat for the operator")?;
    let agents0 = env.farm.counts();
    let since = now_unix();
    let t0 = Instant::now();
    let perf = if large && env.cfg.perf {
        start_perf(env, f.op.pid, window, &label)
    } else {
        None
    };
    tokio::time::sleep(window).await;
    let c1 = f.ec2.calls().await.map_err(|e| e.to_string())?;
    let m1 = f.op.metrics().await?;
    let cpu1 = f.op.cpu_time().ok_or("no /proc stat for the operator")?;
    let dt = t0.elapsed().as_secs_f64();
    let agents1 = env.farm.counts();
    let log = f.ec2.call_log(since).await.map_err(|e| e.to_string())?;
    let per_min = |x: f64| x * 60.0 / dt;

    let actions: HashSet<&String> = c1.calls.keys().chain(c1.throttled.keys()).collect();
    let mut calls_by_action = BTreeMap::new();
    let mut all_calls = 0.0;
    for a in actions {
        let d =
            (c1.accepted(a) + c1.throttled(a)) as f64 - (c0.accepted(a) + c0.throttled(a)) as f64;
        if d > 0.0 {
            calls_by_action.insert(a.clone(), per_min(d));
            all_calls += d;
        }
    }
    let describes = (c1.accepted("DescribeInstances") + c1.throttled("DescribeInstances")) as f64
        - (c0.accepted("DescribeInstances") + c0.throttled("DescribeInstances")) as f64;
    let writes = m1.sum(names::STATUS_WRITES, &[]) - m0.sum(names::STATUS_WRITES, &[]);
    let probes = m1.sum(names::PROBES, &[]) - m0.sum(names::PROBES, &[]);
    let reconciles = m1.sum(names::RECONCILES, &[]) - m0.sum(names::RECONCILES, &[]);
    let cpu = (cpu1 - cpu0).as_secs_f64() / dt * 100.0;
    let refreshes_per_min = 60.0 / f.refresh.as_secs_f64();
    let per_refresh = per_min(describes) / refreshes_per_min;
    // "At most one DescribeInstances call per refresh for every 1,000 instances".
    let allowed = n.div_ceil(1000).max(1) as f64;
    let describe_entries: Vec<_> = log
        .iter()
        .filter(|e| e.action == "DescribeInstances" && e.outcome == "accepted")
        .collect();
    let moto_ms: Vec<f64> = describe_entries.iter().map(|e| e.moto_ms).collect();
    let (rss, _) = f.op.memory_kib().unwrap_or((0, 0));

    let setting = format!(
        "probeInterval {}, --ec2-refresh {} s; {:.1} min window",
        if large {
            "30s (CRD default)".to_owned()
        } else {
            env.cfg.fleet_probe_interval.clone()
        },
        f.refresh.as_secs(),
        dt / 60.0
    );
    res.row(
        &label,
        "DescribeInstances calls per minute",
        format!("{:.1}", per_min(describes)),
        Some(per_min(describes)),
        "",
        Verdict::Info,
        setting.clone(),
    );
    res.row(
        &label,
        "DescribeInstances per refresh",
        format!("{per_refresh:.2}"),
        Some(per_refresh),
        &format!("<= {allowed:.0}"),
        Verdict::of(per_refresh <= allowed + 1e-9),
        format!(
            "{describes:.0} calls in {:.1} refreshes of {n} instances; moto {:.0} ms median, {:.0} ms max per call; at {}",
            dt / f.refresh.as_secs_f64(),
            quantile(&moto_ms, 0.5).unwrap_or(0.0),
            moto_ms.iter().cloned().fold(0.0, f64::max),
            describe_entries
                .iter()
                .map(|e| format!("+{:.1}s ({} ids)", e.t - since, e.n))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    res.row(
        &label,
        "EC2 calls per minute (all actions)",
        format!("{:.1}", per_min(all_calls)),
        Some(per_min(all_calls)),
        "",
        Verdict::Info,
        calls_by_action
            .iter()
            .map(|(k, v)| format!("{k} {v:.1}/min"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    res.row(
        &label,
        "status writes per minute",
        format!("{:.1}", per_min(writes)),
        Some(per_min(writes)),
        "0",
        Verdict::of(writes == 0.0),
        format!(
            "{:.0} probes/min, {:.0} reconciles/min",
            per_min(probes),
            per_min(reconciles)
        ),
    );
    res.row(
        &label,
        "operator CPU, % of one core",
        format!("{cpu:.2} %"),
        Some(cpu),
        "< 5 %",
        Verdict::of(cpu < 5.0),
        format!("utime+stime over {dt:.0} s; VmRSS {}", mib(rss)),
    );
    res.detail(
        &label,
        json!({
            "sandboxes": n,
            "windowSeconds": dt,
            "describeCalls": describes,
            "describeCallsPerMinute": per_min(describes),
            "describeMotoMs": moto_ms,
            "describePerRefresh": per_refresh,
            "describePerRefreshAllowed": allowed,
            "ec2CallsPerMinute": calls_by_action,
            "ec2CallsPerMinuteAll": per_min(all_calls),
            "statusWrites": writes,
            "statusWritesPerMinute": per_min(writes),
            "probesPerMinute": per_min(probes),
            "reconcilesPerMinute": per_min(reconciles),
            "agentHealthRequests": agents1.health - agents0.health,
            "cpuPercentOfOneCore": cpu,
            "vmRssKiB": rss,
            "operatorFlags": f.op.args,
            "perf": perf.as_ref().map(|p| p.1.display().to_string()),
        }),
    );
    if let Some((child, data)) = perf {
        finish_perf(env, child, &data, &label).await;
    }
    Ok(())
}

fn start_perf(
    env: &Env,
    pid: u32,
    window: Duration,
    label: &str,
) -> Option<(std::process::Child, PathBuf)> {
    let data = env.dir.join(format!("{label}.perf.data"));
    let child = std::process::Command::new("perf")
        .args(["record", "-F", "199", "-g", "-o"])
        .arg(&data)
        .args(["-p", &pid.to_string(), "--", "sleep"])
        .arg(format!("{}", window.as_secs().saturating_sub(2).max(1)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match child {
        Ok(c) => Some((c, data)),
        Err(e) => {
            eprintln!("[bench] perf is not available ({e}); no profile");
            None
        }
    }
}

async fn finish_perf(
    env: &Env,
    mut child: std::process::Child,
    data: &std::path::Path,
    label: &str,
) {
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    let out = std::process::Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "dso,symbol",
            "--percent-limit",
            "1",
            "-g",
            "none",
            "-i",
        ])
        .arg(data)
        .output();
    let report = env.dir.join(format!("{label}.perf.txt"));
    match out {
        Ok(o) => {
            let _ = std::fs::write(&report, &o.stdout);
            eprintln!("[bench] perf profile: {}", report.display());
        }
        Err(e) => eprintln!("[bench] perf report failed: {e}"),
    }
}

async fn steady_large(env: &Env, res: &mut Results) -> Result<(), String> {
    let n = env.cfg.steady_size;
    let label = format!("steady-{n}");
    let ns = format!("bench-{label}");
    let ec2 = env.endpoint(&label).await?;
    let ids = env.precreate(&ec2, n).await?;
    env.namespace(&ns).await?;
    let op = env
        .operator(&label, &ns, &ec2, &operator_flags(&[]))
        .await?;
    let watch = FleetWatch::start(&env.client, &ns);
    let names: Vec<String> = (0..n).map(sandbox_name).collect();
    let objects: Vec<Sandbox> = names
        .iter()
        .zip(&ids)
        .map(|(name, id)| {
            fleet::manifest(
                name,
                &label,
                &Source::Adopt {
                    instance_id: id.clone(),
                    observe_only: false,
                },
                &env.farm.url(&format!("{label}-{name}")),
                None,
            )
        })
        .collect();
    let t0 = Instant::now();
    fleet::create_all(&env.client, &ns, objects, 32).await?;
    let waited = watch
        .wait(
            Duration::from_secs(900),
            |m| m.len() == n && m.values().all(|s| s.ready),
            |m| format!("{}/{n} Ready", m.values().filter(|s| s.ready).count()),
        )
        .await;
    match waited {
        Ok(_) => res.row(
            &label,
            "time until all adopted and Ready",
            secs(t0.elapsed()),
            Some(t0.elapsed().as_secs_f64()),
            "",
            Verdict::Info,
            format!(
                "{n} running instances made at the endpoint beforehand, adopted by spec.instanceId"
            ),
        ),
        Err(e) => return Err(format!("the fleet did not converge: {e}")),
    }
    let fleet = Fleet {
        label: label.clone(),
        ns,
        ec2,
        op,
        watch,
        names,
        refresh: Duration::from_secs(30),
    };
    steady(env, res, &fleet, true).await
}

// ------------------------------------------------------------------------------------------
// reaction
// ------------------------------------------------------------------------------------------

async fn reaction(env: &Env, res: &mut Results, f: &Fleet) -> Result<(), String> {
    let api: Api<Sandbox> = Api::namespaced(env.client.clone(), &f.ns);
    let half = (env.cfg.changes / 2).clamp(1, f.names.len());
    let chosen: Vec<String> = f.names.iter().take(half).cloned().collect();
    let ids: HashMap<String, String> = f.watch.with(|m| {
        chosen
            .iter()
            .filter_map(|n| {
                m.get(n)
                    .and_then(|s| s.instance_id.clone())
                    .map(|id| (n.clone(), id))
            })
            .collect()
    });
    if ids.len() != chosen.len() {
        return Err("some sandboxes have no instance id in status".into());
    }
    let mut latencies: Vec<f64> = Vec::new();
    let mut samples = Vec::new();
    let mut missing = 0;
    let gap = Duration::from_millis(700);
    for (state, action) in [("Stopped", "StopInstances"), ("Running", "StartInstances")] {
        for name in &chosen {
            let id = &ids[name];
            let t0 = now_unix();
            let started = Instant::now();
            api.patch(
                name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &Patch::Merge(json!({"spec": {"powerState": state}})),
            )
            .await
            .map_err(|e| format!("patching {name}: {e}"))?;
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut found = None;
            while Instant::now() < deadline {
                let log = f
                    .ec2
                    .call_log(t0 - 0.001)
                    .await
                    .map_err(|e| e.to_string())?;
                if let Some(e) = log
                    .iter()
                    .find(|e| e.action == action && e.ids.iter().any(|i| i == id))
                {
                    found = Some((e.t - t0, e.outcome.clone()));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            match found {
                Some((lat, outcome)) => {
                    latencies.push(lat);
                    samples.push(json!({"sandbox": name, "to": state, "action": action, "seconds": lat, "outcome": outcome}));
                }
                None => {
                    missing += 1;
                    samples.push(
                        json!({"sandbox": name, "to": state, "action": action, "seconds": null}),
                    );
                }
            }
            let spent = started.elapsed();
            if spent < gap {
                tokio::time::sleep(gap - spent).await;
            }
        }
        let want = if state == "Stopped" {
            "stopped"
        } else {
            "running"
        };
        f.watch
            .wait(
                Duration::from_secs(120),
                |m| {
                    chosen.iter().all(|n| {
                        m.get(n).is_some_and(|s| {
                            s.instance_state.as_deref() == Some(want)
                                && (state == "Stopped" || s.ready)
                        })
                    })
                },
                |m| {
                    format!(
                        "{} of {} {want}",
                        chosen
                            .iter()
                            .filter(|n| m
                                .get(*n)
                                .is_some_and(|s| s.instance_state.as_deref() == Some(want)))
                            .count(),
                        chosen.len()
                    )
                },
            )
            .await
            .map_err(|e| format!("after the {state} flips: {e}"))?;
    }
    let p50 = quantile(&latencies, 0.5);
    let p99 = quantile(&latencies, 0.99);
    let max = latencies.iter().cloned().fold(0.0, f64::max);
    let note = format!(
        "{} changes ({} stops then {} starts, 0.7 s apart); patch sent -> call arrives at the endpoint; max {:.3} s{}",
        latencies.len() + missing,
        half,
        half,
        max,
        if missing > 0 {
            format!("; {missing} changes saw no call within 20 s")
        } else {
            String::new()
        }
    );
    res.row(
        "reaction",
        "spec change -> EC2 call, p50",
        p50.map(|v| format!("{:.0} ms", v * 1000.0))
            .unwrap_or("-".into()),
        p50,
        "",
        Verdict::Info,
        "",
    );
    res.row(
        "reaction",
        "spec change -> EC2 call, p99",
        p99.map(|v| format!("{:.0} ms", v * 1000.0))
            .unwrap_or("-".into()),
        p99,
        "<= 1 s",
        Verdict::of(missing == 0 && p99.is_some_and(|v| v <= 1.0)),
        note,
    );
    res.detail(
        "reaction",
        json!({"p50Seconds": p50, "p99Seconds": p99, "maxSeconds": max, "missing": missing, "samples": samples}),
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------
// rollout
// ------------------------------------------------------------------------------------------

async fn rollout(env: &Env, res: &mut Results, f: &Fleet) -> Result<(), String> {
    let n = f.names.len();
    let mu = env.cfg.max_unavailable.max(1);
    let waves = n.div_ceil(mu);
    let t = env.cfg.deploy_time;
    let ideal = t.as_secs_f64() * waves as f64;
    env.farm.set_deploy_time(t);
    // Every sandbox Ready before it starts.
    f.watch
        .wait(
            Duration::from_secs(120),
            |m| f.names.iter().all(|x| m.get(x).is_some_and(|s| s.ready)),
            |m| format!("{} Ready", m.values().filter(|s| s.ready).count()),
        )
        .await?;

    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let crd = crds
        .get_opt("sandboxdeploys.fleet.valet.dev")
        .await
        .map_err(|e| format!("reading the SandboxDeploy CRD: {e}"))?;
    let mut controller_ran = false;
    if crd.is_none() {
        res.row(
            "rollout",
            "SandboxDeploy makespan",
            "not run",
            None,
            "<= 1.1x",
            Verdict::NotRun,
            "the SandboxDeploy CRD is not installed",
        );
    } else {
        let deploys: Api<SandboxDeploy> = Api::namespaced(env.client.clone(), &f.ns);
        let sd: SandboxDeploy = serde_json::from_value(json!({
            "apiVersion": "fleet.valet.dev/v1alpha1",
            "kind": "SandboxDeploy",
            "metadata": {"name": "bench-rollout"},
            "spec": {
                "image": {"tag": "v2"},
                "selector": {"matchLabels": {FLEET_LABEL: f.label}},
                "strategy": {
                    "maxUnavailable": mu,
                    "drainTimeout": "1m",
                    "targetDeadline": "5m",
                    "failurePolicy": "Continue",
                    "autoRollback": false,
                },
                "paused": false,
            },
        }))
        .map_err(|e| format!("building the SandboxDeploy: {e}"))?;
        let t0 = Instant::now();
        deploys
            .create(&PostParams::default(), &sd)
            .await
            .map_err(|e| format!("creating the SandboxDeploy: {e}"))?;
        let mut acted = false;
        while t0.elapsed() < Duration::from_secs(30) {
            let d = deploys
                .get("bench-rollout")
                .await
                .map_err(|e| e.to_string())?;
            if d.status.as_ref().is_some_and(|s| s.phase.is_some()) {
                acted = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !acted {
            let _ = deploys
                .delete("bench-rollout", &DeleteParams::default())
                .await;
            res.row(
                "rollout",
                "SandboxDeploy makespan",
                "not run",
                None,
                "<= 1.1x",
                Verdict::NotRun,
                "not run: SandboxDeploy controller not present (no status 30 s after create)",
            );
        } else {
            controller_ran = true;
            let timeout = Duration::from_secs_f64(ideal * 5.0 + 300.0);
            let mut last = None;
            while t0.elapsed() < timeout {
                let d = deploys
                    .get("bench-rollout")
                    .await
                    .map_err(|e| e.to_string())?;
                let st = d.status.clone().unwrap_or_default();
                use sandbox_operator::api::DeployPhase as P;
                if matches!(
                    st.phase,
                    Some(P::Succeeded | P::Failed | P::Aborted | P::Superseded)
                ) {
                    last = Some((t0.elapsed(), st));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            match last {
                Some((makespan, st)) => {
                    let ratio = makespan.as_secs_f64() / ideal;
                    // Per target: started -> finished (whole seconds in status).
                    let per_target: Vec<f64> = st
                        .targets
                        .iter()
                        .filter_map(|t| match (&t.started_at, &t.finished_at) {
                            (Some(a), Some(b)) => Some((b.0.as_second() - a.0.as_second()) as f64),
                            _ => None,
                        })
                        .collect();
                    let failed: Vec<String> = st
                        .targets
                        .iter()
                        .filter(|t| {
                            !matches!(t.phase, sandbox_operator::api::TargetPhase::Succeeded)
                        })
                        .map(|t| {
                            format!(
                                "{} {:?}: {}",
                                t.name,
                                t.phase,
                                t.message.clone().unwrap_or_default()
                            )
                        })
                        .collect();
                    res.row(
                        "rollout",
                        "SandboxDeploy makespan",
                        secs(makespan),
                        Some(makespan.as_secs_f64()),
                        "",
                        Verdict::Info,
                        format!(
                            "phase {:?}, {} of {} updated, {} failed; per target p50 {:.0} s, max {:.0} s{}",
                            st.phase,
                            st.updated,
                            st.total,
                            st.failed,
                            quantile(&per_target, 0.5).unwrap_or(0.0),
                            per_target.iter().cloned().fold(0.0, f64::max),
                            if failed.is_empty() {
                                String::new()
                            } else {
                                format!(
                                    "; not succeeded: {}",
                                    failed.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
                                )
                            }
                        ),
                    );
                    res.row(
                        "rollout",
                        "makespan / (waves x deploy time)",
                        format!("{ratio:.2}x"),
                        Some(ratio),
                        "<= 1.1x",
                        Verdict::of(ratio <= 1.1),
                        format!("{waves} waves x {:.0} s = {ideal:.0} s", t.as_secs_f64()),
                    );
                    res.detail(
                        "rollout",
                        json!({"makespanSeconds": makespan.as_secs_f64(), "ideal": ideal, "ratio": ratio, "waves": waves, "perTargetSeconds": per_target, "notSucceeded": failed, "status": st}),
                    );
                }
                None => res.row(
                    "rollout",
                    "SandboxDeploy makespan",
                    format!("> {} s", timeout.as_secs()),
                    None,
                    "<= 1.1x",
                    Verdict::Missed,
                    "the SandboxDeploy did not finish",
                ),
            }
        }
    }
    if controller_ran {
        return Ok(());
    }

    // Fallback: the bench drives the waves by setting image.tag itself.
    let tag = "v2";
    let api: Api<Sandbox> = Api::namespaced(env.client.clone(), &f.ns);
    let started = Instant::now();
    let mut wave_times = Vec::new();
    let mut per_sandbox = Vec::new();
    for wave in f.names.chunks(mu) {
        let w0 = Instant::now();
        futures::future::try_join_all(wave.iter().map(|name| {
            let api = api.clone();
            async move {
                api.patch(
                    name,
                    &PatchParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &Patch::Merge(json!({"spec": {"image": {"tag": tag}}})),
                )
                .await
                .map_err(|e| format!("setting image.tag on {name}: {e}"))
            }
        }))
        .await?;
        let mut done: HashMap<String, Duration> = HashMap::new();
        let deadline = w0 + t * 10 + Duration::from_secs(120);
        while done.len() < wave.len() && Instant::now() < deadline {
            f.watch.with(|m| {
                for name in wave {
                    if done.contains_key(name) {
                        continue;
                    }
                    if let Some(s) = m.get(name)
                        && s.agent_tag.as_deref() == Some(tag)
                        && s.deploy
                            .as_ref()
                            .is_some_and(|(dt, st)| dt == tag && st == "Succeeded")
                    {
                        done.insert(name.clone(), w0.elapsed());
                    }
                }
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if done.len() < wave.len() {
            return Err(format!(
                "wave {} did not finish: {} of {} sandboxes report {tag}",
                wave_times.len() + 1,
                done.len(),
                wave.len()
            ));
        }
        per_sandbox.extend(done.values().map(|d| d.as_secs_f64()));
        wave_times.push(w0.elapsed().as_secs_f64());
    }
    let makespan = started.elapsed().as_secs_f64();
    let ratio = makespan / ideal;
    let p50 = quantile(&per_sandbox, 0.5).unwrap_or(0.0);
    res.row(
        "rollout*",
        "makespan, bench-driven waves",
        format!("{makespan:.1} s"),
        Some(makespan),
        "",
        Verdict::Info,
        format!(
            "FALLBACK (no SandboxDeploy controller): the bench sets image.tag on {mu} sandboxes at a time and waits for each wave; per-sandbox tag-set -> Succeeded p50 {p50:.1} s, max {:.1} s",
            per_sandbox.iter().cloned().fold(0.0, f64::max)
        ),
    );
    res.row(
        "rollout*",
        "makespan / (waves x deploy time)",
        format!("{ratio:.2}x"),
        Some(ratio),
        "<= 1.1x",
        Verdict::of(ratio <= 1.1),
        format!(
            "{waves} waves x {:.0} s = {ideal:.0} s; measures the Sandbox controller's part only",
            t.as_secs_f64()
        ),
    );
    res.detail(
        "rollout-fallback",
        json!({
            "makespanSeconds": makespan,
            "ideal": ideal,
            "ratio": ratio,
            "waves": waves,
            "waveSeconds": wave_times,
            "perSandboxSeconds": per_sandbox,
            "deployTimeSeconds": t.as_secs_f64(),
            "agentRequests": env.farm.counts(),
        }),
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------
// memory
// ------------------------------------------------------------------------------------------

async fn memory(env: &Env, res: &mut Results) -> Result<(), String> {
    let sizes = env.cfg.memory_sizes.clone();
    let most = sizes.iter().copied().max().unwrap_or(0);
    let label = "memory";
    let ns = "bench-memory".to_owned();
    let ec2 = env.endpoint(label).await?;
    let ids = env.precreate(&ec2, most).await?;
    env.namespace(&ns).await?;
    // Probed and refreshed every 10 minutes (see the report): moto answers DescribeInstances
    // at about 2 ms per instance, so 10,000 instances every 30 s would drown it; the objects
    // the operator holds are the same.
    let flags = operator_flags(&[("ec2-refresh", "10m"), ("resync", "30m")]);
    let op = env.operator(label, &ns, &ec2, &flags).await?;
    let watch = FleetWatch::start(&env.client, &ns);
    let idle = op.memory_kib().map(|m| m.0).unwrap_or(0);
    let mut created = 0;
    let mut samples = Vec::new();
    for &size in &sizes {
        let objects: Vec<Sandbox> = (created..size)
            .map(|i| {
                let name = sandbox_name(i);
                fleet::manifest(
                    &name,
                    label,
                    &Source::Adopt {
                        instance_id: ids[i].clone(),
                        observe_only: true,
                    },
                    &env.farm.url(&format!("{label}-{name}")),
                    Some("10m"),
                )
            })
            .collect();
        let t0 = Instant::now();
        fleet::create_all(&env.client, &ns, objects, 48).await?;
        created = size;
        eprintln!(
            "[bench]   {size} Sandboxes exist ({:.0} s to create); waiting for all Ready",
            t0.elapsed().as_secs_f64()
        );
        watch
            .wait(
                Duration::from_secs(1800),
                |m| m.len() == size && m.values().all(|s| s.ready),
                |m| format!("{}/{size} Ready", m.values().filter(|s| s.ready).count()),
            )
            .await?;
        let converged = t0.elapsed();
        tokio::time::sleep(if env.cfg.quick {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(30)
        })
        .await;
        let mut rss = Vec::new();
        let mut hwm = 0;
        for _ in 0..20 {
            if let Some((r, h)) = op.memory_kib() {
                rss.push(r);
                hwm = h;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let max = rss.iter().copied().max().unwrap_or(0);
        let last = rss.last().copied().unwrap_or(0);
        let (target, ok) = if env.cfg.quick {
            (String::new(), None)
        } else if size <= 2000 {
            ("< 64 MiB".to_owned(), Some(max < 64 * 1024))
        } else {
            ("< 256 MiB".to_owned(), Some(max < 256 * 1024))
        };
        res.row(
            label,
            &format!("VmRSS with {size} Sandboxes"),
            mib(max),
            Some(max as f64 / 1024.0),
            &target,
            ok.map(Verdict::of).unwrap_or(Verdict::Info),
            format!(
                "ObserveOnly, adopting running instances, agent reports in status; VmHWM {} (incl. the start-up burst); all Ready {:.0} s after create began",
                mib(hwm),
                converged.as_secs_f64()
            ),
        );
        samples.push(json!({"sandboxes": size, "vmRssMaxKiB": max, "vmRssLastKiB": last, "vmHwmKiB": hwm, "convergeSeconds": converged.as_secs_f64()}));
        let _ = &watch;
    }
    res.detail(
        label,
        json!({"idleVmRssKiB": idle, "samples": samples, "operatorFlags": op.args, "probeInterval": "10m"}),
    );
    Ok(())
}
