//! The `sandbox-operator run` process under measurement: started as users start it, its
//! `/metrics` read and parsed, its CPU time and resident memory read from `/proc`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A running operator; killed when dropped.
pub struct OperatorProc {
    child: Child,
    /// Its process id.
    pub pid: u32,
    /// Its HTTP address (`/metrics`).
    pub http: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
    /// The flags it was started with (after `run`).
    pub args: Vec<String>,
    client: reqwest::Client,
}

/// Where the `sandbox-operator` binary is: `SANDBOX_BENCH_OPERATOR`, else next to this
/// executable (both are built into the same target directory).
pub fn operator_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("SANDBOX_BENCH_OPERATOR") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| format!("{} has no directory", exe.display()))?;
    let bin = dir.join("sandbox-operator");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "no sandbox-operator next to {} (build it: cargo build --release --bins)",
            exe.display()
        ))
    }
}

impl OperatorProc {
    /// Starts `bin run` for `namespace` against `ec2_url` with `extra` flags; waits until its
    /// HTTP server answers.
    pub async fn start(
        bin: &Path,
        kubeconfig: &Path,
        namespace: &str,
        ec2_url: &str,
        extra: &[String],
        log: PathBuf,
    ) -> Result<Self, String> {
        let port = sandbox_operator::testenv::free_port();
        let http: SocketAddr = format!("127.0.0.1:{port}").parse().expect("an address");
        let mut args: Vec<String> = [
            "--namespace",
            namespace,
            "--ec2-endpoint",
            ec2_url,
            "--region",
            sandbox_operator::testenv::ec2::REGION,
            "--http-addr",
            &http.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().cloned());
        let mut cmd = Command::new(bin);
        cmd.env("SANDBOX_OPERATOR_LEDGER", "off");
        cmd.arg("run")
            .args(&args)
            .env("KUBECONFIG", kubeconfig)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("SANDBOX_OPERATOR_LOG", "info");
        let child = sandbox_operator::testenv::process::spawn_tied(cmd, &log)
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let pid = child.id();
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?;
        let mut me = Self {
            child,
            pid,
            http,
            log,
            args,
            client,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = me
                .client
                .get(format!("http://{}/healthz", me.http))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(me);
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                return Err(format!(
                    "sandbox-operator exited with {status}; its log:\n{}",
                    sandbox_operator::testenv::controlplane::tail(&me.log, 40)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "sandbox-operator did not answer /healthz within 60 s; its log:\n{}",
                    sandbox_operator::testenv::controlplane::tail(&me.log, 40)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its `/metrics`, parsed.
    pub async fn metrics(&self) -> Result<Metrics, String> {
        let text = self
            .client
            .get(format!("http://{}/metrics", self.http))
            .send()
            .await
            .map_err(|e| format!("reading /metrics: {e}"))?
            .text()
            .await
            .map_err(|e| format!("reading /metrics: {e}"))?;
        Ok(Metrics::parse(&text))
    }

    /// CPU time used so far (user + system), from `/proc/PID/stat`.
    pub fn cpu_time(&self) -> Option<Duration> {
        cpu_time(self.pid)
    }

    /// `VmRSS` and `VmHWM` in KiB, from `/proc/PID/status`.
    pub fn memory_kib(&self) -> Option<(u64, u64)> {
        memory_kib(self.pid)
    }
}

impl Drop for OperatorProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of `pid`.
#[allow(unsafe_code)] // libc calls; the test environment only
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may contain spaces: fields count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ", field 3 (state) is index 0; utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(Duration::from_secs_f64((utime + stime) as f64 / hz as f64))
}

/// (VmRSS, VmHWM) of `pid` in KiB.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// One sample of a Prometheus text exposition: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name as exposed (`..._total` for counters).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A parsed `/metrics` answer.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Every sample.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the text format (comments skipped; label values without escaped quotes).
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (head, value) = match line.rfind(' ') {
                Some(i) => (&line[..i], &line[i + 1..]),
                None => continue,
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match head.find('{') {
                Some(i) => {
                    let inner = head[i + 1..].trim_end_matches('}');
                    let mut labels = BTreeMap::new();
                    for pair in inner.split("\",") {
                        if let Some((k, v)) = pair.split_once('=') {
                            labels.insert(
                                k.trim().trim_start_matches(',').to_owned(),
                                v.trim().trim_matches('"').to_owned(),
                            );
                        }
                    }
                    (head[..i].to_owned(), labels)
                }
                None => (head.to_owned(), BTreeMap::new()),
            };
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        Self { samples }
    }

    /// The sum of `name` over the samples whose labels include all of `with`.
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                with.iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// `name`'s values keyed by the values of `keys` (joined by `/`).
    pub fn by(&self, name: &str, keys: &[&str]) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.name == name) {
            let k = keys
                .iter()
                .map(|k| s.labels.get(*k).cloned().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("/");
            *out.entry(k).or_insert(0.0) += s.value;
        }
        out
    }
}

/// Names of the operator's metrics the bench reads.
pub mod names {
    /// Status writes per controller.
    pub const STATUS_WRITES: &str = "sandbox_operator_status_writes_total";
    /// EC2 calls by action and outcome.
    pub const EC2_CALLS: &str = "sandbox_operator_ec2_api_calls_total";
    /// Reconciles per controller.
    pub const RECONCILES: &str = "sandbox_operator_reconciles_total";
    /// Reconcile errors per controller and kind.
    pub const RECONCILE_ERRORS: &str = "sandbox_operator_reconcile_errors_total";
    /// Agent probes per result.
    pub const PROBES: &str = "sandbox_operator_agent_probes_total";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_and_sums() {
        let m = Metrics::parse(
            "# TYPE x counter\nsandbox_operator_ec2_api_calls_total{action=\"DescribeInstances\",outcome=\"ok\"} 3\nsandbox_operator_ec2_api_calls_total{action=\"DescribeInstances\",outcome=\"throttled\"} 2\nsandbox_operator_status_writes_total{controller=\"sandbox\"} 7\n# EOF\n",
        );
        assert_eq!(
            m.sum(names::EC2_CALLS, &[("action", "DescribeInstances")]),
            5.0
        );
        assert_eq!(m.sum(names::STATUS_WRITES, &[]), 7.0);
        assert_eq!(
            m.by(names::EC2_CALLS, &["action", "outcome"])["DescribeInstances/ok"],
            3.0
        );
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(memory_kib(pid).unwrap().0 > 0);
        assert!(cpu_time(pid).is_some());
    }
}
