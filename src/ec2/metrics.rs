//! The layer's Prometheus metrics: EC2 calls per action and outcome (AWS's throttling among
//! them), the operator's own client-side pacing (counted apart: it is not throttling), and
//! tracked instances.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// How an EC2 call (one attempt) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered with success.
    Ok,
    /// AWS answered `RequestLimitExceeded` (or another throttling code).
    Throttled,
    /// Any other failure.
    Error,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Throttled => "throttled",
            Self::Error => "error",
        }
    }
}

/// What the operator's client-side pacing did to a call it held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paced {
    /// The call waited for its bucket, then went out.
    Waited,
    /// The wait would have exceeded its bound: nothing was sent, the caller retries later.
    Refused,
    /// A launch took its place in line and comes back when its turn is due.
    Queued,
}

impl Paced {
    fn as_str(self) -> &'static str {
        match self {
            Self::Waited => "waited",
            Self::Refused => "refused",
            Self::Queued => "queued",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    action: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

/// The counters behind `register_metrics` and `call_counts`.
#[derive(Debug, Default)]
pub struct Metrics {
    calls: Family<CallLabels, Counter>,
    paced: Family<CallLabels, Counter>,
    paced_seconds: Family<ActionLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    tracked: Gauge,
    actions: Mutex<BTreeSet<&'static str>>,
    paced_actions: Mutex<BTreeSet<&'static str>>,
}

impl Metrics {
    /// Counts a call of `action` that the client-side pacing held back for `wait` (nothing
    /// to do with AWS throttling, which [`Self::call`] counts).
    pub fn paced(&self, action: &'static str, outcome: Paced, wait: std::time::Duration) {
        self.paced_actions
            .lock()
            .expect("metrics lock")
            .insert(action);
        self.paced
            .get_or_create(&CallLabels {
                action,
                outcome: outcome.as_str(),
            })
            .inc();
        if outcome != Paced::Refused {
            self.paced_seconds
                .get_or_create(&ActionLabels { action })
                .inc_by(wait.as_secs_f64());
        }
    }

    /// Calls held back by the client-side pacing, per `action/outcome` (`waited`, `refused`,
    /// `queued`).
    pub fn paced_counts(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let actions = self.paced_actions.lock().expect("metrics lock").clone();
        for action in actions {
            for o in [Paced::Waited, Paced::Refused, Paced::Queued] {
                if let Some(c) = self.paced.get(&CallLabels {
                    action,
                    outcome: o.as_str(),
                }) {
                    out.insert(format!("{action}/{}", o.as_str()), c.get());
                }
            }
        }
        out
    }

    /// Counts one attempt of `action`.
    pub fn call(&self, action: &'static str, outcome: Outcome) {
        self.actions.lock().expect("metrics lock").insert(action);
        self.calls
            .get_or_create(&CallLabels {
                action,
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// Sets the tracked-instances gauge.
    pub fn set_tracked(&self, n: usize) {
        self.tracked.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Attempts per action, all outcomes together.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        let actions = self.actions.lock().expect("metrics lock").clone();
        actions
            .into_iter()
            .map(|action| {
                let total = [Outcome::Ok, Outcome::Throttled, Outcome::Error]
                    .into_iter()
                    .filter_map(|o| {
                        self.calls
                            .get(&CallLabels {
                                action,
                                outcome: o.as_str(),
                            })
                            .map(|c| c.get())
                    })
                    .sum();
                (action.to_owned(), total)
            })
            .collect()
    }

    /// Registers `ec2_api_calls` (counter, labels `action` and `outcome`) and
    /// `ec2_tracked_instances` (gauge).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ec2_api_calls",
            "EC2 API calls by action and outcome (ok; throttled = AWS answered RequestLimitExceeded; error); every attempt counts, retries included",
            self.calls.clone(),
        );
        registry.register(
            "ec2_client_paced",
            "EC2 calls held back by the operator's own client-side pacing, not by AWS, by action and outcome (waited = sent after waiting for the bucket; refused = not sent, retried later; queued = a launch took its turn in line)",
            self.paced.clone(),
        );
        registry.register(
            "ec2_client_paced_wait_seconds",
            "Seconds EC2 calls waited in the operator's own client-side pacing, by action",
            self.paced_seconds.clone(),
        );
        registry.register(
            "ec2_tracked_instances",
            "Instances in the EC2 layer's shared view (tracked for periodic refresh)",
            self.tracked.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_outcomes_and_encode() {
        let m = Metrics::default();
        m.call("DescribeInstances", Outcome::Ok);
        m.call("DescribeInstances", Outcome::Throttled);
        m.call("StopInstances", Outcome::Error);
        m.set_tracked(3);
        let counts = m.counts();
        assert_eq!(counts["DescribeInstances"], 2);
        assert_eq!(counts["StopInstances"], 1);

        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"ec2_api_calls_total{action="DescribeInstances",outcome="throttled"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("ec2_tracked_instances 3"), "{text}");
    }

    #[test]
    fn pacing_is_counted_apart_from_throttling() {
        let m = Metrics::default();
        m.paced(
            "RunInstances",
            Paced::Refused,
            std::time::Duration::from_secs(90),
        );
        m.paced(
            "DescribeInstances",
            Paced::Waited,
            std::time::Duration::from_millis(500),
        );
        // Pacing is not a call: nothing went to AWS.
        assert!(m.counts().get("RunInstances").is_none_or(|n| *n == 0));
        let paced = m.paced_counts();
        assert_eq!(paced.get("RunInstances/refused"), Some(&1));
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"ec2_client_paced_total{action="RunInstances",outcome="refused"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"ec2_client_paced_wait_seconds_total{action="DescribeInstances"} 0.5"#),
            "{text}"
        );
        assert!(!text.contains(r#"outcome="throttled""#), "{text}");
    }
}
