//! What the bench runs, and how big (issue 9, DESIGN.md section 6).
//!
//! One real control plane (`ControlPlane`), the wrapped moto EC2 endpoint with AWS-like
//! throttling on (a fresh endpoint per scenario, so that moto's cost per instance does not
//! carry over), the real `sandbox-operator run` binary (one process per scenario, watching the
//! scenario's namespace), and virtual agents served by this process ([`agents`]). Every
//! figure is measured once and printed beside its target; nothing here is a test, and a missed
//! target is a finding, not a failure.
//!
//! Scenarios, in the order they run:
//! 1. `converge-N` for each N: N Sandboxes with `spec.launch` applied at once; time until all
//!    are Ready, against the bound the endpoint's request buckets set; calls per action;
//!    objects that ever showed a failure. The first fleet stays up for 2-4.
//! 2. `steady-N` on that fleet (the figures issue 3 asks for), and `steady-1000` on a fleet
//!    of adopted instances: DescribeInstances and status writes per minute, CPU share.
//! 3. `reaction`: powerState flips on the first fleet, each timed from the patch to the
//!    arrival of its Stop/StartInstances at the endpoint (the endpoint's call log).
//! 4. `rollout`: a SandboxDeploy over the first fleet, or, without its controller, the bench
//!    setting `image.tag` wave by wave (reported separately).
//! 5. `memory`: the operator's VmRSS with 2,000 and 10,000 ObserveOnly Sandboxes.
//! 6. `first-status`: 500 Sandboxes with `spec.launch` applied at once; seconds until every one
//!    carries a phase, a Ready condition and its observedGeneration (issue 12), while most
//!    launches still wait for the pacing of RunInstances.
//! 7. `pool-N`: a SandboxPool scaled from 0 to N (100) through its scale subresource, timed to
//!    all Ready beside the RunInstances bucket's bound; then `pool-standby`: a scale-out by one
//!    timed to Ready when a stopped standby member is started versus when a member is launched
//!    (the standby's advantage, as a ratio).

use std::path::PathBuf;
use std::time::Duration;

use crate::report::Previous;

/// What to run, and how big.
#[derive(Debug, Clone)]
pub struct Config {
    /// Smaller sizes and shorter windows (a smoke run).
    pub quick: bool,
    /// Fleet sizes for `converge`; the first fleet also serves steady, reaction and rollout.
    pub converge_sizes: Vec<usize>,
    /// Sandboxes in the large steady-state fleet.
    pub steady_size: usize,
    /// The measuring window of the steady scenarios.
    pub steady_window: Duration,
    /// Quiet time before a steady window starts (past the convergence traffic and at least one
    /// EC2 refresh).
    pub settle: Duration,
    /// Spec changes timed by `reaction` (half stops, half starts).
    pub changes: usize,
    /// `maxUnavailable` of the rollout.
    pub max_unavailable: usize,
    /// How long one sandbox's deploy takes at its (virtual) agent.
    pub deploy_time: Duration,
    /// Sandbox counts at which `memory` samples RSS.
    pub memory_sizes: Vec<usize>,
    /// Sandboxes applied at once by `first-status`.
    pub first_status_size: usize,
    /// The size the `pool` scenario scales a SandboxPool to from 0.
    pub pool_size: usize,
    /// How long instances stay pending/stopping/shutting-down at the endpoint.
    pub transitions: Duration,
    /// `spec.agent.probeInterval` of the launched fleets (the adopted fleets use the CRD
    /// default for steady state, 10m for memory).
    pub fleet_probe_interval: String,
    /// Scenarios to run (`converge`, `steady`, `reaction`, `rollout`, `memory`,
    /// `first-status`, `pool`); all if empty.
    pub only: Vec<String>,
    /// Record a `perf` profile of the operator during the large steady window.
    pub perf: bool,
    /// Where results.json, logs and profiles go.
    pub out: PathBuf,
    /// The `sandbox-operator` binary.
    pub operator_bin: PathBuf,
    /// The previous run's figures (its results file, read before this run overwrites it),
    /// printed beside the new ones.
    pub previous: Option<Previous>,
}

impl Config {
    /// The full run (`make bench`).
    pub fn full(operator_bin: PathBuf) -> Self {
        Self {
            quick: false,
            converge_sizes: vec![100, 500],
            steady_size: 1000,
            steady_window: Duration::from_secs(120),
            settle: Duration::from_secs(45),
            changes: 100,
            max_unavailable: 10,
            deploy_time: Duration::from_secs(10),
            memory_sizes: vec![2000, 10_000],
            first_status_size: 500,
            pool_size: 100,
            transitions: Duration::from_secs(1),
            fleet_probe_interval: "10s".into(),
            only: vec![],
            perf: false,
            out: PathBuf::from("target/bench/results.json"),
            operator_bin,
            previous: None,
        }
    }

    /// The smoke run (`--quick`).
    pub fn quick(operator_bin: PathBuf) -> Self {
        Self {
            quick: true,
            converge_sizes: vec![20, 50],
            steady_size: 100,
            steady_window: Duration::from_secs(30),
            settle: Duration::from_secs(35),
            changes: 20,
            max_unavailable: 5,
            deploy_time: Duration::from_secs(3),
            memory_sizes: vec![200, 1000],
            first_status_size: 100,
            pool_size: 20,
            ..Self::full(operator_bin)
        }
    }

    pub fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}
