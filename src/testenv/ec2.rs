//! The wrapped moto EC2 endpoint, started on a free loopback port.
//!
//! [`Ec2Endpoint::start`] runs `tests/tools/ec2/ec2_endpoint.py` (moto's EC2 backend in server
//! mode behind a thin layer) from the Python venv that `hack/install-tools.sh venv` creates, and
//! waits for it to print `LISTENING <port>`. The layer adds what the operator meets on real EC2
//! and moto lacks: ClientToken idempotency on `RunInstances`, `pending`/`stopping`/
//! `shutting-down` states that last a configurable time, AWS-like request throttling
//! (`RequestLimitExceeded`), EC2's eventual consistency after RunInstances (a new instance
//! unknown to DescribeInstances by id and CreateTags, and absent from filtered answers, for a
//! configurable time), injected faults and latency, and per-action call counts. The
//! wrapper's docstring documents the control API that the methods here call.
//!
//! The child process never outlives its owner: it is killed when the [`Ec2Endpoint`] is
//! dropped; it is spawned through [`super::process::spawn_tied_with`] (parent-death signal set
//! from a long-lived thread), and it also exits by itself when its stdin, a pipe held by this
//! process, closes. So a test binary that panics, aborts or is killed leaves nothing behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::config::Credentials;
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::process::{Child, ChildStdin, ChildStdout, Command};

/// The region the endpoint serves (moto takes it from the request signature).
pub const REGION: &str = "us-east-1";

/// Environment variable naming the Python venv (default `<cache_dir>/venv`, i.e.
/// `~/.cache/sandbox-operator/venv`).
pub const VENV_ENV: &str = "SANDBOX_OPERATOR_VENV";

/// Environment variable naming the wrapper script (default
/// `<CARGO_MANIFEST_DIR>/tests/tools/ec2/ec2_endpoint.py`).
pub const WRAPPER_ENV: &str = "SANDBOX_OPERATOR_EC2_WRAPPER";

/// Names of the wrapper's throttling token buckets, for [`ThrottleConfig::bucket`].
///
/// Defaults (capacity / refill per second) follow the Amazon EC2 developer guide's "Request
/// throttling for the Amazon EC2 API".
pub mod bucket {
    /// `Describe*`, `List*`, `Search*`, `Get*` not in another bucket (100 / 20).
    pub const DESCRIBE: &str = "describe";
    /// `DescribeInstances`, `DescribeInstanceStatus`, `DescribeNetworkInterfaces`,
    /// `DescribeSecurityGroups`, `DescribeSnapshots`, `DescribeSpotInstanceRequests` and
    /// `DescribeVolumes` sent without filters and pagination (50 / 10).
    pub const DESCRIBE_UNFILTERED: &str = "describe_unfiltered";
    /// Every other action, `StopInstances` included (50 / 5).
    pub const MUTATING: &str = "mutating";
    /// Security-group ingress rules, key pairs, spot requests, VPC peering (50 / 5).
    pub const RESOURCE_INTENSIVE: &str = "resource_intensive";
    /// `RunInstances` requests (5 / 2).
    pub const RUN_INSTANCES: &str = "run_instances";
    /// `StartInstances` requests (5 / 2).
    pub const START_INSTANCES: &str = "start_instances";
    /// `TerminateInstances` requests (100 / 5).
    pub const TERMINATE_INSTANCES: &str = "terminate_instances";
    /// `CreateTags` requests (100 / 10).
    pub const CREATE_TAGS: &str = "create_tags";
    /// `DeleteTags` requests (100 / 10).
    pub const DELETE_TAGS: &str = "delete_tags";
    /// Instances launched by `RunInstances`, one token each (1000 / 2).
    pub const RUN_INSTANCES_RESOURCES: &str = "run_instances_resources";
    /// Instances started by `StartInstances`, one token each (1000 / 2).
    pub const START_INSTANCES_RESOURCES: &str = "start_instances_resources";
    /// Instances stopped by `StopInstances`, one token each (1000 / 20).
    pub const STOP_INSTANCES_RESOURCES: &str = "stop_instances_resources";
    /// Instances terminated by `TerminateInstances`, one token each (1000 / 20).
    pub const TERMINATE_INSTANCES_RESOURCES: &str = "terminate_instances_resources";
}

/// Errors from starting or controlling the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum Ec2EndpointError {
    /// The venv's Python interpreter is missing.
    #[error("no Python at {0}; create the venv with `hack/install-tools.sh venv`")]
    VenvMissing(PathBuf),
    /// The wrapper script is missing.
    #[error("the EC2 endpoint wrapper {0} does not exist")]
    WrapperMissing(PathBuf),
    /// The child process could not be started.
    #[error("could not start {program}: {source}")]
    Spawn {
        /// The interpreter that failed to start.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The child exited, or closed its stdout, before printing `LISTENING <port>`.
    #[error("the EC2 endpoint exited before it was ready ({status}); its log:\n{log}")]
    EarlyExit {
        /// The exit status, as far as it is known.
        status: String,
        /// The child's stderr.
        log: String,
    },
    /// The child printed nothing within the start-up timeout.
    #[error("the EC2 endpoint was not ready within {timeout:?}; its log:\n{log}")]
    StartTimeout {
        /// The timeout that passed.
        timeout: Duration,
        /// The child's stderr.
        log: String,
    },
    /// The child's first line was not `LISTENING <port>`.
    #[error("the EC2 endpoint printed {line:?} instead of `LISTENING <port>`")]
    BadHandshake {
        /// The line it printed.
        line: String,
    },
    /// Local I/O (log file, pipes) failed.
    #[error("I/O error around the EC2 endpoint: {0}")]
    Io(#[from] std::io::Error),
    /// A control API request could not be sent or its answer not read.
    #[error("control request {method} {path} failed: {source}")]
    Http {
        /// HTTP method.
        method: String,
        /// Path under the endpoint's URL.
        path: String,
        /// The client error.
        #[source]
        source: reqwest::Error,
    },
    /// A control API request was refused.
    #[error("control request {method} {path} answered {status}: {body}")]
    Control {
        /// HTTP method.
        method: String,
        /// Path under the endpoint's URL.
        path: String,
        /// HTTP status.
        status: u16,
        /// The response body (`{"error": "..."}`).
        body: String,
    },
}

/// How to start the endpoint. `Default` gives instant state transitions, throttling off and a
/// one-minute start-up timeout.
#[derive(Debug, Clone)]
pub struct Ec2EndpointOptions {
    /// How long instances read `pending` after `RunInstances`/`StartInstances`.
    pub pending: Duration,
    /// How long instances read `stopping` after `StopInstances`.
    pub stopping: Duration,
    /// How long instances read `shutting-down` after `TerminateInstances`.
    pub shutting_down: Duration,
    /// Start with throttling on, with the AWS-documented bucket sizes.
    pub throttle: bool,
    /// EC2's eventual consistency: how long after RunInstances a new instance stays unknown
    /// to DescribeInstances by id (`InvalidInstanceID.NotFound` for the whole call), absent
    /// from answers without ids, and refused by CreateTags. Zero: off.
    pub consistency: Duration,
    /// How long to wait for `LISTENING` (importing moto takes a second or two; shared machines
    /// can be much slower).
    pub startup_timeout: Duration,
    /// Log every request on the child's stderr.
    pub verbose: bool,
    /// Where the child's stderr goes; `None` = a temporary file removed with the endpoint.
    pub log_file: Option<PathBuf>,
}

impl Default for Ec2EndpointOptions {
    fn default() -> Self {
        Self {
            pending: Duration::ZERO,
            stopping: Duration::ZERO,
            shutting_down: Duration::ZERO,
            throttle: false,
            consistency: Duration::ZERO,
            startup_timeout: Duration::from_secs(60),
            verbose: false,
            log_file: None,
        }
    }
}

impl Ec2EndpointOptions {
    /// Sets the `pending`, `stopping` and `shutting-down` durations to `d`.
    pub fn with_transitions(mut self, d: Duration) -> Self {
        self.pending = d;
        self.stopping = d;
        self.shutting_down = d;
        self
    }

    /// Sets EC2's eventual-consistency window after RunInstances (see
    /// [`Self::consistency`]).
    pub fn with_consistency(mut self, d: Duration) -> Self {
        self.consistency = d;
        self
    }
}

/// The eventual-consistency mode as the endpoint reports it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Consistency {
    /// How long a new instance stays unseen, in seconds (0: off).
    pub seconds: f64,
    /// The instances not visible yet.
    pub hidden: Vec<String>,
}

/// A fault to inject: the next `count` calls of `action` fail with `code`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fault {
    /// The EC2 action (`"RunInstances"`), or `"*"` for every action.
    pub action: String,
    /// The EC2 error code (`"InsufficientInstanceCapacity"`).
    pub code: String,
    /// The HTTP status (400-599).
    pub status: u16,
    /// The error message; `None` = a generic one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How many calls fail; `None` = every call until [`Ec2Endpoint::clear_faults`].
    #[serde(serialize_with = "serialize_count")]
    pub count: Option<u32>,
}

fn serialize_count<S: serde::Serializer>(count: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
    match count {
        Some(n) => s.serialize_i64(i64::from(*n)),
        None => s.serialize_i64(-1),
    }
}

impl Fault {
    /// The next call of `action` fails with `code` and HTTP 400.
    pub fn new(action: impl Into<String>, code: impl Into<String>) -> Self {
        Self {
            action: action.into(),
            code: code.into(),
            status: 400,
            message: None,
            count: Some(1),
        }
    }

    /// Sets the HTTP status.
    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Sets the error message.
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// Fails the next `n` calls (n >= 1).
    pub fn times(mut self, n: u32) -> Self {
        self.count = Some(n);
        self
    }

    /// Fails every call until the faults are cleared.
    pub fn until_cleared(mut self) -> Self {
        self.count = None;
        self
    }
}

/// One token bucket's settings; `None` leaves a value as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct BucketConfig {
    /// Maximum tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<f64>,
    /// Tokens added per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refill_per_second: Option<f64>,
}

/// A change to throttling: switch it on or off and/or resize buckets (see [`bucket`]). Each
/// bucket named here, and every bucket when throttling is switched on, starts full.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ThrottleConfig {
    /// `Some(true)` switches throttling on, `Some(false)` off, `None` leaves it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Buckets to change, by name.
    pub buckets: BTreeMap<String, BucketConfig>,
}

impl ThrottleConfig {
    /// Switches throttling on (buckets as they are).
    pub fn enabled() -> Self {
        Self {
            enabled: Some(true),
            buckets: BTreeMap::new(),
        }
    }

    /// Switches throttling off.
    pub fn disabled() -> Self {
        Self {
            enabled: Some(false),
            buckets: BTreeMap::new(),
        }
    }

    /// Sets a bucket's capacity and refill rate.
    pub fn bucket(mut self, name: &str, capacity: f64, refill_per_second: f64) -> Self {
        self.buckets.insert(
            name.to_owned(),
            BucketConfig {
                capacity: Some(capacity),
                refill_per_second: Some(refill_per_second),
            },
        );
        self
    }
}

/// A change to the transitional-state durations; `None` leaves one as it is. Applies to
/// transitions that start afterwards.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Delays {
    /// `pending` after `RunInstances`/`StartInstances`.
    pub pending: Option<Duration>,
    /// `stopping` after `StopInstances`.
    pub stopping: Option<Duration>,
    /// `shutting-down` after `TerminateInstances`.
    pub shutting_down: Option<Duration>,
}

impl Delays {
    /// All three durations set to `d`.
    pub fn all(d: Duration) -> Self {
        Self {
            pending: Some(d),
            stopping: Some(d),
            shutting_down: Some(d),
        }
    }

    fn to_json(self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (key, value) in [
            ("pending_seconds", self.pending),
            ("stopping_seconds", self.stopping),
            ("shutting_down_seconds", self.shutting_down),
        ] {
            if let Some(d) = value {
                map.insert(key.to_owned(), d.as_secs_f64().into());
            }
        }
        serde_json::Value::Object(map)
    }
}

/// Calls seen per EC2 action since start or the last reset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct CallCounts {
    /// Calls that passed throttling and fault injection and were handed to moto (whatever
    /// moto answered).
    pub calls: BTreeMap<String, u64>,
    /// Calls refused with `RequestLimitExceeded`.
    pub throttled: BTreeMap<String, u64>,
    /// Calls failed by an injected fault.
    pub faulted: BTreeMap<String, u64>,
}

impl CallCounts {
    /// Accepted calls of `action`.
    pub fn accepted(&self, action: &str) -> u64 {
        self.calls.get(action).copied().unwrap_or(0)
    }

    /// Throttled calls of `action`.
    pub fn throttled(&self, action: &str) -> u64 {
        self.throttled.get(action).copied().unwrap_or(0)
    }

    /// Faulted calls of `action`.
    pub fn faulted(&self, action: &str) -> u64 {
        self.faulted.get(action).copied().unwrap_or(0)
    }

    /// Accepted calls of all actions.
    pub fn total_accepted(&self) -> u64 {
        self.calls.values().sum()
    }
}

/// One EC2 request as the endpoint logged it (see [`Ec2Endpoint::call_log`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CallLogEntry {
    /// Arrival time, wall clock, Unix seconds.
    pub t: f64,
    /// The EC2 action.
    pub action: String,
    /// `accepted`, `throttled` or `faulted`.
    pub outcome: String,
    /// The request token bucket it drew from (see [`bucket`]).
    pub bucket: String,
    /// The instance ids it named (empty for `Describe*` calls, which keep only [`Self::n`]).
    #[serde(default)]
    pub ids: Vec<String>,
    /// How many instance ids it named.
    #[serde(default)]
    pub n: usize,
    /// Milliseconds from arrival to answer (waiting for moto's lock included).
    pub ms: f64,
    /// Milliseconds moto itself took (0 when the call never reached moto).
    #[serde(default)]
    pub moto_ms: f64,
}

/// Ids to launch instances with.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Ec2Defaults {
    /// A Linux x86_64 AMI among moto's built-in images (moto accepts any `ImageId` anyway).
    pub ami: String,
    /// The default VPC's subnet in us-east-1a.
    pub subnet: String,
    /// The default VPC's `default` security group.
    pub security_group: String,
    /// The default VPC.
    pub vpc: String,
    /// The region, `us-east-1`.
    pub region: String,
}

/// A running wrapped moto EC2 endpoint on 127.0.0.1; stopped when dropped. It may be shared
/// (e.g. in a `static`) by tests running on different tokio runtimes.
#[derive(Debug)]
pub struct Ec2Endpoint {
    child: Child,
    /// Kept open: the child exits when it closes.
    stdin: Option<ChildStdin>,
    /// Kept open so the child never writes to a closed pipe.
    _stdout: std::io::BufReader<ChildStdout>,
    port: u16,
    http: reqwest::Client,
    log_path: PathBuf,
    _log_file: Option<tempfile::TempPath>,
}

impl Ec2Endpoint {
    /// Starts the wrapper from the venv's Python (`$SANDBOX_OPERATOR_VENV`, else
    /// [`super::cache_dir`]`/venv`, i.e. `~/.cache/sandbox-operator/venv` by default; wrapper:
    /// `$SANDBOX_OPERATOR_EC2_WRAPPER`, else
    /// `<CARGO_MANIFEST_DIR>/tests/tools/ec2/ec2_endpoint.py`) and waits for `LISTENING`
    /// (about 1.5 s on an idle machine).
    pub async fn start(opts: Ec2EndpointOptions) -> Result<Self, Ec2EndpointError> {
        let python = venv_dir().join("bin").join("python");
        if !python.exists() {
            return Err(Ec2EndpointError::VenvMissing(python));
        }
        let wrapper = wrapper_path();
        if !wrapper.exists() {
            return Err(Ec2EndpointError::WrapperMissing(wrapper));
        }

        let (log, log_path, log_temp) = match &opts.log_file {
            Some(path) => (std::fs::File::create(path)?, path.clone(), None),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("ec2-endpoint-")
                    .suffix(".log")
                    .tempfile()?;
                let (file, path) = temp.into_parts();
                (file, path.to_path_buf(), Some(path))
            }
        };

        let mut cmd = Command::new(&python);
        cmd.arg(&wrapper)
            .args(["--port", "0", "--exit-on-stdin-eof"])
            .arg("--pending-seconds")
            .arg(opts.pending.as_secs_f64().to_string())
            .arg("--stopping-seconds")
            .arg(opts.stopping.as_secs_f64().to_string())
            .arg("--shutting-down-seconds")
            .arg(opts.shutting_down.as_secs_f64().to_string())
            .arg("--consistency-seconds")
            .arg(opts.consistency.as_secs_f64().to_string())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if opts.throttle {
            cmd.arg("--throttle");
        }
        if opts.verbose {
            cmd.arg("--verbose");
        }
        // Spawned from the testenv's long-lived spawner thread with the parent-death signal
        // set, so the child dies with this process even if it is killed outright; the stdin
        // pipe (the wrapper exits on its EOF) is the second line of defence.
        let mut child =
            super::process::spawn_tied_with(cmd).map_err(|source| Ec2EndpointError::Spawn {
                program: python.clone(),
                source,
            })?;
        let stdin = child.stdin.take();
        let Some(stdout) = child.stdout.take() else {
            kill_and_reap(&mut child);
            return Err(std::io::Error::other("the EC2 endpoint's stdout was not captured").into());
        };

        // A blocking read on a blocking-pool thread: it ends when the line comes or, after a
        // timeout, when the killed child's stdout closes.
        let read = tokio::task::spawn_blocking(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            let result = reader.read_line(&mut line).map(|n| (n, line));
            (reader, result)
        });
        let (stdout, result) = match tokio::time::timeout(opts.startup_timeout, read).await {
            Ok(Ok(done)) => done,
            Ok(Err(join)) => {
                kill_and_reap(&mut child);
                return Err(std::io::Error::other(format!("reading LISTENING: {join}")).into());
            }
            Err(_) => {
                kill_and_reap(&mut child);
                return Err(Ec2EndpointError::StartTimeout {
                    timeout: opts.startup_timeout,
                    log: read_log(&log_path),
                });
            }
        };
        let port = match result {
            Err(err) => {
                kill_and_reap(&mut child);
                return Err(err.into());
            }
            Ok((0, _)) => {
                let status = wait_briefly(&mut child);
                return Err(Ec2EndpointError::EarlyExit {
                    status,
                    log: read_log(&log_path),
                });
            }
            Ok((_, line)) => match line
                .trim()
                .strip_prefix("LISTENING ")
                .and_then(|p| p.parse::<u16>().ok())
            {
                Some(port) => port,
                None => {
                    kill_and_reap(&mut child);
                    return Err(Ec2EndpointError::BadHandshake {
                        line: line.trim().to_owned(),
                    });
                }
            },
        };

        // No pooled connections: a shared endpoint may be used from several tokio runtimes
        // (one per test), and a pooled connection dies with the runtime that opened it.
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(30))
            .build();
        let http = match http {
            Ok(http) => http,
            Err(source) => {
                kill_and_reap(&mut child);
                return Err(Ec2EndpointError::Http {
                    method: "GET".to_owned(),
                    path: "/".to_owned(),
                    source,
                });
            }
        };

        Ok(Self {
            child,
            stdin,
            _stdout: stdout,
            port,
            http,
            log_path,
            _log_file: log_temp,
        })
    }

    /// The endpoint's base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The wrapper process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The port the endpoint listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The file the child's stderr goes to.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The child's stderr so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// SDK configuration for this endpoint: its URL, region us-east-1, static dummy
    /// credentials and the SDK's standard retry mode.
    pub async fn sdk_config(&self) -> SdkConfig {
        self.sdk_config_with_retries(RetryConfig::standard()).await
    }

    /// Like [`Self::sdk_config`] with the given retry configuration
    /// (`RetryConfig::disabled()` to see every error as it comes).
    pub async fn sdk_config_with_retries(&self, retry: RetryConfig) -> SdkConfig {
        aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(self.url())
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new(
                "testing",
                "testing",
                None,
                None,
                "sandbox-operator-testenv",
            ))
            .retry_config(retry)
            .load()
            .await
    }

    /// An EC2 client for this endpoint with standard retries.
    pub async fn client(&self) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::new(&self.sdk_config().await)
    }

    /// An EC2 client for this endpoint with the given retry configuration.
    pub async fn client_with_retries(&self, retry: RetryConfig) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::new(&self.sdk_config_with_retries(retry).await)
    }

    /// An EC2 client for this endpoint that never retries.
    pub async fn client_without_retries(&self) -> aws_sdk_ec2::Client {
        self.client_with_retries(RetryConfig::disabled()).await
    }

    /// Calls per action (accepted, throttled, faulted) since start or the last reset.
    pub async fn calls(&self) -> Result<CallCounts, Ec2EndpointError> {
        self.control(reqwest::Method::GET, "/calls", None)
            .await
            .and_then(|v| decode(v, "/calls"))
    }

    /// The EC2 requests that arrived at or after `since` (Unix seconds; 0 = all the endpoint
    /// keeps, the last 100,000), oldest first. [`Self::reset_calls`] empties the log.
    pub async fn call_log(&self, since: f64) -> Result<Vec<CallLogEntry>, Ec2EndpointError> {
        #[derive(Deserialize)]
        struct Log {
            entries: Vec<CallLogEntry>,
        }
        self.control(
            reqwest::Method::GET,
            &format!("/calls/log?since={since:.6}"),
            None,
        )
        .await
        .and_then(|v| decode::<Log>(v, "/calls/log"))
        .map(|l| l.entries)
    }

    /// Zeroes the call counts and empties the call log.
    pub async fn reset_calls(&self) -> Result<(), Ec2EndpointError> {
        self.control(reqwest::Method::POST, "/calls/reset", None)
            .await
            .map(drop)
    }

    /// Makes the next calls of an action fail (see [`Fault`]). Faults on one action are used
    /// in the order they were added.
    pub async fn inject_fault(&self, fault: Fault) -> Result<(), Ec2EndpointError> {
        let body = serde_json::to_value(&fault).expect("a Fault serializes");
        self.control(reqwest::Method::POST, "/faults", Some(body))
            .await
            .map(drop)
    }

    /// Adds `latency` before every call of `action` (`"*"` = every action without its own);
    /// zero removes it.
    pub async fn set_latency(
        &self,
        action: &str,
        latency: Duration,
    ) -> Result<(), Ec2EndpointError> {
        let body = serde_json::json!({
            "action": action,
            "latency_ms": latency.as_secs_f64() * 1000.0,
        });
        self.control(reqwest::Method::POST, "/faults", Some(body))
            .await
            .map(drop)
    }

    /// Holds the answer to every call of `action` for `delay` *after* EC2 has acted on it: the
    /// window in which a client killed mid-call has changed EC2 without knowing it. Zero removes it.
    pub async fn set_response_delay(
        &self,
        action: &str,
        delay: Duration,
    ) -> Result<(), Ec2EndpointError> {
        let body = serde_json::json!({
            "action": action,
            "response_delay_ms": delay.as_secs_f64() * 1000.0,
        });
        self.control(reqwest::Method::POST, "/faults", Some(body))
            .await
            .map(drop)
    }

    /// Removes every injected fault and latency.
    pub async fn clear_faults(&self) -> Result<(), Ec2EndpointError> {
        self.control(reqwest::Method::DELETE, "/faults", None)
            .await
            .map(drop)
    }

    /// Changes throttling (see [`ThrottleConfig`]).
    pub async fn set_throttle(&self, config: ThrottleConfig) -> Result<(), Ec2EndpointError> {
        let body = serde_json::to_value(&config).expect("a ThrottleConfig serializes");
        self.control(reqwest::Method::PUT, "/throttle", Some(body))
            .await
            .map(drop)
    }

    /// Changes the transitional-state durations (see [`Delays`]).
    pub async fn set_delays(&self, delays: Delays) -> Result<(), Ec2EndpointError> {
        self.control(reqwest::Method::PUT, "/delays", Some(delays.to_json()))
            .await
            .map(drop)
    }

    /// Sets EC2's eventual-consistency window for instances launched from now on (zero:
    /// off): see [`Ec2EndpointOptions::consistency`].
    pub async fn set_consistency(&self, window: Duration) -> Result<(), Ec2EndpointError> {
        let body = serde_json::json!({ "seconds": window.as_secs_f64() });
        self.control(reqwest::Method::PUT, "/consistency", Some(body))
            .await
            .map(drop)
    }

    /// The eventual-consistency window and the instances not visible yet.
    pub async fn consistency(&self) -> Result<Consistency, Ec2EndpointError> {
        self.control(reqwest::Method::GET, "/consistency", None)
            .await
            .and_then(|v| decode(v, "/consistency"))
    }

    /// Ids to launch instances with (AMI, subnet, security group).
    pub async fn defaults(&self) -> Result<Ec2Defaults, Ec2EndpointError> {
        self.control(reqwest::Method::GET, "/defaults", None)
            .await
            .and_then(|v| decode(v, "/defaults"))
    }

    /// Whether the endpoint answers its health check.
    pub async fn healthy(&self) -> bool {
        self.control(reqwest::Method::GET, "/health", None)
            .await
            .is_ok()
    }

    async fn control(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, Ec2EndpointError> {
        let full = format!("/_endpoint{path}");
        let method_name = method.to_string();
        let http_err = |source| Ec2EndpointError::Http {
            method: method_name.clone(),
            path: full.clone(),
            source,
        };
        let mut request = self.http.request(method, format!("{}{full}", self.url()));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(http_err)?;
        let status = response.status();
        let text = response.text().await.map_err(http_err)?;
        if !status.is_success() {
            return Err(Ec2EndpointError::Control {
                method: method_name.clone(),
                path: full,
                status: status.as_u16(),
                body: text,
            });
        }
        serde_json::from_str(&text).map_err(|err| Ec2EndpointError::Control {
            method: method_name,
            path: full,
            status: status.as_u16(),
            body: format!("unreadable JSON ({err}): {text}"),
        })
    }
}

impl Drop for Ec2Endpoint {
    fn drop(&mut self) {
        // Closing stdin alone makes the wrapper exit; kill it anyway, and reap it.
        drop(self.stdin.take());
        kill_and_reap(&mut self.child);
    }
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The child's exit status after it closed its stdout, waiting at most a few seconds.
fn wait_briefly(child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                kill_and_reap(child);
                return "stdout closed while still running; killed".to_owned();
            }
            Err(err) => return format!("unknown: {err}"),
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    path: &str,
) -> Result<T, Ec2EndpointError> {
    serde_json::from_value::<T>(value.clone()).map_err(|err| Ec2EndpointError::Control {
        method: "GET".to_owned(),
        path: format!("/_endpoint{path}"),
        status: 200,
        body: format!("unexpected answer ({err}): {value}"),
    })
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| format!("(log unreadable: {err})"))
}

fn venv_dir() -> PathBuf {
    std::env::var_os(VENV_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| super::cache_dir().join("venv"))
}

fn wrapper_path() -> PathBuf {
    std::env::var_os(WRAPPER_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/ec2/ec2_endpoint.py")
        })
}
