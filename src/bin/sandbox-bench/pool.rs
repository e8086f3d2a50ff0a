//! The `pool` scenario: a SandboxPool scaled from 0 to N through its scale subresource against
//! the throttled endpoint, beside the bound its request buckets set; then the standby's
//! advantage: the time from a scale-out to the new member Ready when a stopped standby member
//! is started, versus when a new instance is launched.

use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::{Env, FIELD_MANAGER, INITIAL_TAG, secs};
use crate::fleet::TOKEN_SECRET;
use crate::report::{Results, Verdict};
use sandbox_operator::api::{SandboxPool, SandboxPoolStatus};

fn manifest(
    name: &str,
    ami: &str,
    url: &str,
    replicas: usize,
    standby: usize,
) -> serde_json::Value {
    json!({
        "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "SandboxPool",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "standby": standby,
            "scaleDown": {"idleWindow": "0s"},
            "template": {
                "metadata": {"labels": {"bench": name}},
                "spec": {
                    "environment": "staging", "instanceType": "t3.large",
                    "launch": {"imageId": ami},
                    "image": {"tag": INITIAL_TAG},
                    "agent": {"urlTemplate": url, "tokenSecretRef": {"name": TOKEN_SECRET, "key": "token"}, "probeInterval": "2s", "timeout": "2s"},
                },
            },
        },
    })
}

async fn wait(
    pools: &Api<SandboxPool>,
    name: &str,
    timeout: Duration,
    f: impl Fn(&SandboxPoolStatus) -> bool,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut last = SandboxPoolStatus::default();
    while t0.elapsed() < timeout {
        if let Ok(p) = pools.get(name).await {
            last = p.status.unwrap_or_default();
            if f(&last) {
                return Ok(t0.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "pool {name}: gave up after {} s: replicas {}, ready {}, standby {}",
        timeout.as_secs(),
        last.replicas,
        last.ready,
        last.standby
    ))
}

async fn scale(pools: &Api<SandboxPool>, name: &str, n: usize) -> Result<(), String> {
    pools
        .patch_scale(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"replicas": n}})),
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("scaling {name} to {n}: {e}"))
}

pub(super) async fn pool(env: &Env, res: &mut Results) -> Result<(), String> {
    let n = env.cfg.pool_size;
    let label = format!("pool-{n}");
    let ns = "bench-pool".to_string();
    let ec2 = env.endpoint(&label).await?;
    let ami = ec2.defaults().await.map_err(|e| e.to_string())?.ami;
    env.namespace(&ns).await?;
    let op = env.operator(&label, &ns, &ec2, &[]).await?;
    let pools: Api<SandboxPool> = Api::namespaced(env.client.clone(), &ns);
    // Every member's agent at the farm, by instance id.
    let url = env.farm.url("{instanceId}");
    let apply = |name: &str, replicas: usize, standby: usize| {
        let m = manifest(name, &ami, &url, replicas, standby);
        let pools = pools.clone();
        let name = name.to_owned();
        async move {
            pools
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&m),
                )
                .await
                .map(|_| ())
                .map_err(|e| format!("applying pool {name}: {e}"))
        }
    };

    // ---- 0 -> N ----
    apply("fleet", 0, 0).await?;
    wait(&pools, "fleet", Duration::from_secs(60), |s| {
        s.observed_generation.is_some()
    })
    .await?;
    let buckets = env.buckets(&ec2).await?;
    let (run_c, run_r) = buckets
        .get(sandbox_operator::testenv::ec2::bucket::RUN_INSTANCES)
        .copied()
        .unwrap_or((5.0, 2.0));
    let bound = ((n as f64 - run_c) / run_r).max(0.0);
    ec2.reset_calls().await.map_err(|e| e.to_string())?;
    scale(&pools, "fleet", n).await?;
    let timeout = Duration::from_secs_f64((bound * 4.0).max(300.0));
    let scaled = wait(&pools, "fleet", timeout, |s| s.ready as usize == n).await;
    let calls = ec2.calls().await.map_err(|e| e.to_string())?;
    match &scaled {
        Ok(t) => {
            let ratio = t.as_secs_f64() / bound.max(0.001);
            res.row(
                &label,
                "scale 0 -> N, time until all Ready",
                secs(*t),
                Some(t.as_secs_f64()),
                "",
                Verdict::Info,
                format!("kubectl-scale equivalent (scale subresource) to {n}"),
            );
            res.row(
                &label,
                "bound set by the RunInstances bucket",
                secs(Duration::from_secs_f64(bound)),
                Some(bound),
                "",
                Verdict::Info,
                format!("({n} - {run_c:.0}) / {run_r:.0} per second"),
            );
            res.row(
                &label,
                "ratio to the bound",
                format!("{ratio:.2}x"),
                Some(ratio),
                "<= 1.2x",
                Verdict::of(ratio <= 1.2),
                format!(
                    "RunInstances {} accepted + {} throttled",
                    calls.accepted("RunInstances"),
                    calls.throttled("RunInstances")
                ),
            );
        }
        Err(e) => res.row(
            &label,
            "scale 0 -> N, time until all Ready",
            format!("> {} s", timeout.as_secs()),
            None,
            "",
            Verdict::Missed,
            e.clone(),
        ),
    }
    scale(&pools, "fleet", 0).await?;
    wait(&pools, "fleet", timeout, |s| {
        s.replicas == 0 && s.retiring == 0
    })
    .await?;

    // ---- the standby's advantage ----
    apply("warm", 1, 1).await?;
    apply("cold", 1, 0).await?;
    wait(&pools, "warm", Duration::from_secs(300), |s| {
        s.ready == 1 && s.standby == 1
    })
    .await?;
    wait(&pools, "cold", Duration::from_secs(300), |s| s.ready == 1).await?;
    scale(&pools, "warm", 2).await?;
    let warm = wait(&pools, "warm", Duration::from_secs(300), |s| s.ready == 2).await?;
    scale(&pools, "cold", 2).await?;
    let cold = wait(&pools, "cold", Duration::from_secs(300), |s| s.ready == 2).await?;
    let ratio = cold.as_secs_f64() / warm.as_secs_f64().max(0.001);
    res.row(
        "pool-standby",
        "scale-out to Ready, standby member started",
        secs(warm),
        Some(warm.as_secs_f64()),
        "",
        Verdict::Info,
        "a stopped member of the pool started (StartInstances)",
    );
    res.row(
        "pool-standby",
        "scale-out to Ready, new member launched",
        secs(cold),
        Some(cold.as_secs_f64()),
        "",
        Verdict::Info,
        "a new member launched (RunInstances)",
    );
    res.row(
        "pool-standby",
        "standby advantage (launched / started)",
        format!("{ratio:.2}x"),
        Some(ratio),
        ">= 5x",
        Verdict::of(ratio >= 5.0),
        format!(
            "the endpoint keeps a launched and a started instance pending alike ({} s) and a virtual agent answers on a fresh instance at once: what a standby saves on EC2 (booting the AMI, cloud-init installing the agent) is not modelled here",
            env.cfg.transitions.as_secs_f64()
        ),
    );
    res.detail(
        &label,
        json!({
            "n": n,
            "scaleSeconds": scaled.as_ref().ok().map(|t| t.as_secs_f64()),
            "boundSeconds": bound,
            "standbyStartSeconds": warm.as_secs_f64(),
            "launchSeconds": cold.as_secs_f64(),
            "operatorFlags": op.args,
        }),
    );
    Ok(())
}
