//! Measuring the writer: a deterministic synthetic fleet history and a throughput run.

use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};

use crate::api::{Environment, Market};

use super::LedgerError;
use super::event::{
    DeployStepEvent, Ec2ActionEvent, InstanceStateEvent, LedgerEvent, NamespacedName, Outcome,
    SecretSyncEvent, SecretTargetKind, StopReason,
};
use super::writer::LedgerHandle;

/// The shape of a synthetic history.
#[derive(Clone, Copy, Debug)]
pub struct Synthetic {
    /// Events in all.
    pub events: usize,
    /// Sandboxes they are spread over.
    pub sandboxes: usize,
    /// The history's end; it starts `span` earlier.
    pub end: Timestamp,
    /// How long the history covers.
    pub span: SignedDuration,
}

/// The `n`th event of a synthetic history: per sandbox, a cycle of ten events (start, EC2
/// actions, deploy steps, a secret sync, stop), so one event in ten opens a power interval and
/// one in ten closes it (every other stop an auto-stop). Times rise evenly across the span.
pub fn synthetic_event(s: &Synthetic, n: usize) -> LedgerEvent {
    let sandboxes = s.sandboxes.max(1);
    let sb = n % sandboxes;
    let cycle = n / sandboxes;
    let step = cycle % 10;
    let round = cycle / 10;
    let total = s.events.max(1) as i128;
    let span_us = s.span.as_micros();
    let start = s.end.as_microsecond() as i128 - span_us;
    let at_us = start + span_us * n as i128 / total;
    let at = Timestamp::from_microsecond(at_us as i64).unwrap_or(s.end);
    let name = format!("sbx-{sb:05}");
    let sandbox = NamespacedName::new("fleet", name.clone());
    let instance_id = format!("i-{:017x}", sb);
    let instance_type = ["t3.medium", "t3.large", "t3.xlarge"][sb % 3].to_string();
    let market = if sb.is_multiple_of(4) {
        Market::Spot
    } else {
        Market::OnDemand
    };
    let environment = [Environment::Dev, Environment::Staging, Environment::Prod][sb % 3];
    let tag = format!("v{round}");
    let ec2 = |action: &str| {
        LedgerEvent::Ec2Action(Ec2ActionEvent {
            at,
            action: action.into(),
            instance_id: Some(instance_id.clone()),
            sandbox: Some(sandbox.clone()),
            outcome: Outcome::Succeeded,
            error_code: None,
            message: None,
            request_id: Some(format!("req-{n:x}")),
        })
    };
    let state = |state: &str, reason: Option<StopReason>| {
        LedgerEvent::InstanceState(InstanceStateEvent {
            at,
            instance_id: instance_id.clone(),
            sandbox: Some(sandbox.clone()),
            instance_type: Some(instance_type.clone()),
            market,
            state: state.into(),
            stop_reason: reason,
        })
    };
    let deploy = |step: &str, outcome: Outcome| {
        LedgerEvent::DeployStep(DeployStepEvent {
            at,
            namespace: "fleet".into(),
            deploy: Some(format!("deploy-{round}")),
            sandbox: Some(name.clone()),
            environment: Some(environment),
            tag: tag.clone(),
            previous_tag: Some(format!("v{}", round.saturating_sub(1))),
            step: step.into(),
            outcome,
            message: None,
        })
    };
    match step {
        0 => state("running", None),
        1 => ec2("StartInstances"),
        2 => deploy("Draining", Outcome::Started),
        3 => deploy("Deploying", Outcome::Started),
        4 => LedgerEvent::SecretSync(SecretSyncEvent {
            at,
            bundle: NamespacedName::new("fleet", "worker-env"),
            target_kind: SecretTargetKind::Sandbox,
            target_name: name.clone(),
            content_hash: format!("{:064x}", round),
            keys: vec!["API_KEY".into(), "DATABASE_URL".into()],
            outcome: Outcome::Succeeded,
            message: None,
        }),
        5 => ec2("CreateTags"),
        6 => deploy("Verifying", Outcome::Started),
        7 => deploy("Succeeded", Outcome::Succeeded),
        8 => ec2("StopInstances"),
        _ => state(
            "stopped",
            Some(if round.is_multiple_of(2) {
                StopReason::Idle
            } else {
                StopReason::Requested
            }),
        ),
    }
}

/// What a throughput run measured.
#[derive(Clone, Copy, Debug)]
pub struct BenchResult {
    /// Events written.
    pub events: usize,
    /// From the first record to the flush that confirmed the last.
    pub elapsed: Duration,
}

impl BenchResult {
    /// Events per second.
    pub fn per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Records `spec.events` synthetic events through `handle` as fast as the writer takes them
/// (waiting for room in the queue, so nothing is dropped) and flushes: the writer's sustained
/// rate, transactions, derivation of power intervals and all.
pub async fn bench_writer(
    handle: &LedgerHandle,
    spec: Synthetic,
) -> Result<BenchResult, LedgerError> {
    let start = Instant::now();
    for n in 0..spec.events {
        handle.record_wait(synthetic_event(&spec, n)).await;
    }
    handle.flush().await?;
    Ok(BenchResult {
        events: spec.events,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_history_cycles_and_spreads_in_time() {
        let end: Timestamp = "2024-02-01T00:00:00Z".parse().unwrap();
        let s = Synthetic {
            events: 1000,
            sandboxes: 10,
            end,
            span: SignedDuration::from_hours(24 * 30),
        };
        let first = synthetic_event(&s, 0);
        assert_eq!(first.kind(), "instance_state");
        assert_eq!(first.at(), end - SignedDuration::from_hours(24 * 30));
        let mut starts = 0;
        let mut idle_stops = 0;
        let mut last = Timestamp::MIN;
        for n in 0..s.events {
            let e = synthetic_event(&s, n);
            assert!(e.at() >= last, "times rise");
            last = e.at();
            if let LedgerEvent::InstanceState(st) = &e {
                if st.state == "running" {
                    starts += 1;
                } else if st.stop_reason == Some(StopReason::Idle) {
                    idle_stops += 1;
                }
            }
        }
        assert_eq!(starts, 100);
        assert_eq!(idle_stops, 50);
        assert!(last < end);
    }
}
