//! The operator's Prometheus metrics, served on `/metrics`.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels naming a controller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// sandbox, sandboxdeploy or secretbundle.
    pub controller: String,
}

/// Labels naming a controller and an error kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// sandbox, sandboxdeploy or secretbundle.
    pub controller: String,
    /// The error's kind.
    pub error: String,
}

/// A probe outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    /// healthy, degraded, unhealthy, failed or misconfigured.
    pub result: String,
}

/// A phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// The Sandbox phase.
    pub phase: String,
}

/// One sandbox.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SandboxLabels {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// One notification sink and what became of a notice.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotificationLabels {
    /// The sink's name in the config.
    pub sink: String,
    /// sent, failed, deduplicated, rate_limited or dropped.
    pub result: String,
}

/// Every metric the operator exports, registered once.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Mutex<Registry>,
    /// Reconciles per controller.
    pub reconciles: Family<ControllerLabels, Counter>,
    /// Reconcile errors per controller and kind.
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// Agent probes per result.
    pub probes: Family<ProbeLabels, Counter>,
    /// Sandboxes per phase.
    pub sandboxes: Family<PhaseLabels, Gauge>,
    /// Status writes per controller.
    pub status_writes: Family<ControllerLabels, Counter>,
    /// CPU percent from each sandbox's last agent report.
    pub sandbox_cpu: Family<SandboxLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Memory percent.
    pub sandbox_memory: Family<SandboxLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Disk percent.
    pub sandbox_disk: Family<SandboxLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Active workers.
    pub sandbox_active_workers: Family<SandboxLabels, Gauge>,
    /// Instances tagged by the operator whose Sandbox is gone.
    pub orphans: Gauge,
    /// Notifications per sink and result.
    pub notifications: Family<NotificationLabels, Counter>,
    /// SandboxDeploys per phase.
    pub sandboxdeploys: Family<PhaseLabels, Gauge>,
    /// 1 while this process runs the controllers (it holds the leader Lease, or runs without
    /// leader election); 0 while it waits for the Lease or shuts down.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `sandbox_operator` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sandbox_operator");
        let m = Self {
            registry: Mutex::new(Registry::default()),
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            probes: Family::default(),
            sandboxes: Family::default(),
            status_writes: Family::default(),
            sandbox_cpu: Family::default(),
            sandbox_memory: Family::default(),
            sandbox_disk: Family::default(),
            sandbox_active_workers: Family::default(),
            orphans: Gauge::default(),
            notifications: Family::default(),
            sandboxdeploys: Family::default(),
            leader: Gauge::default(),
        };
        registry.register(
            "reconciles",
            "Reconciles per controller",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconcile errors per controller and kind",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "agent_probes",
            "Agent /health probes per result",
            m.probes.clone(),
        );
        registry.register("sandboxes", "Sandboxes per phase", m.sandboxes.clone());
        registry.register(
            "status_writes",
            "Status writes per controller",
            m.status_writes.clone(),
        );
        registry.register(
            "sandbox_cpu_percent",
            "CPU use from the agent's last report",
            m.sandbox_cpu.clone(),
        );
        registry.register(
            "sandbox_memory_percent",
            "Memory use from the agent's last report",
            m.sandbox_memory.clone(),
        );
        registry.register(
            "sandbox_disk_percent",
            "Disk use from the agent's last report",
            m.sandbox_disk.clone(),
        );
        registry.register(
            "sandbox_active_workers",
            "Active workers from the agent's last report",
            m.sandbox_active_workers.clone(),
        );
        registry.register(
            "orphan_instances",
            "Instances tagged by the operator whose Sandbox is gone",
            m.orphans.clone(),
        );
        registry.register(
            "notifications",
            "Notifications per sink and result (sent, failed, deduplicated, rate_limited, dropped)",
            m.notifications.clone(),
        );
        registry.register(
            "sandboxdeploys",
            "SandboxDeploys per phase",
            m.sandboxdeploys.clone(),
        );
        registry.register(
            "leader",
            "1 while this process runs the controllers (holds the leader Lease, or runs without leader election)",
            m.leader.clone(),
        );
        *m.registry.lock().expect("registry") = registry;
        m
    }

    /// Lets another part (the EC2 layer) register its metrics.
    pub fn register_with(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry.lock().expect("registry"));
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let reg = self.registry.lock().expect("registry");
        prometheus_client::encoding::text::encode(&mut out, &reg)
            .expect("encoding metrics into a String");
        out
    }

    /// Counts a reconcile.
    pub fn reconciled(&self, controller: &str) {
        self.reconciles
            .get_or_create(&ControllerLabels {
                controller: controller.into(),
            })
            .inc();
    }

    /// Counts a reconcile error.
    pub fn reconcile_failed(&self, controller: &str, error: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                controller: controller.into(),
                error: error.into(),
            })
            .inc();
    }

    /// Counts what became of a notice for a sink.
    pub fn notified(&self, sink: &str, result: &str) {
        self.notifications
            .get_or_create(&NotificationLabels {
                sink: sink.into(),
                result: result.into(),
            })
            .inc();
    }

    /// Forgets a sandbox's gauges.
    pub fn forget_sandbox(&self, namespace: &str, name: &str) {
        let l = SandboxLabels {
            namespace: namespace.into(),
            name: name.into(),
        };
        self.sandbox_cpu.remove(&l);
        self.sandbox_memory.remove(&l);
        self.sandbox_disk.remove(&l);
        self.sandbox_active_workers.remove(&l);
    }
}
