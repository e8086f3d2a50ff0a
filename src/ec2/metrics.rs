//! The layer's Prometheus metrics: EC2 calls per action and outcome, and tracked instances.

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
    /// Answered `RequestLimitExceeded` (or another throttling code).
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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    action: &'static str,
    outcome: &'static str,
}

/// The counters behind `register_metrics` and `call_counts`.
#[derive(Debug, Default)]
pub struct Metrics {
    calls: Family<CallLabels, Counter>,
    tracked: Gauge,
    actions: Mutex<BTreeSet<&'static str>>,
}

impl Metrics {
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
            "EC2 API calls by action and outcome (ok, throttled, error); every attempt counts, retries included",
            self.calls.clone(),
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
}
