//! Shared fixtures: one control plane for the whole test binary, a namespace per test, kubectl.

#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use sandbox_operator::testenv::{ControlPlane, ControlPlaneOptions};

/// The control plane every test shares, started on first use with the CRDs from `crds/`
/// installed. Its processes end when the test binary does.
pub fn control_plane() -> &'static ControlPlane {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    CP.get_or_init(|| {
        sandbox_operator::util::install_crypto_provider();
        // The test harness leaves by `exit`, which never drops statics: stop the processes and
        // remove their files from an exit hook. (Were the binary killed, the kernel still ends
        // the processes, and the next run sweeps the files.)
        extern "C" fn stop_at_exit() {
            if let Some(cp) = CP.get() {
                cp.shutdown();
            }
        }
        // SAFETY: registering a plain function with the C runtime's exit hooks.
        unsafe {
            libc::atexit(stop_at_exit);
        }
        // Started on a runtime of its own: each test has its own runtime, and this one must not
        // belong to whichever test came first.
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(ControlPlane::start(ControlPlaneOptions::default()))
        })
        .join()
        .expect("control plane start-up thread")
        .unwrap_or_else(|e| panic!("starting the test control plane: {e}"))
    })
}

/// The Docker engine (with Compose and a registry holding the worker image) every test of the
/// binary shares, started on first use and stopped at exit, like the control plane.
pub fn docker_engine() -> &'static sandbox_operator::testenv::docker::DockerEngine {
    use sandbox_operator::testenv::docker::DockerEngine;
    static ENGINE: OnceLock<DockerEngine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        extern "C" fn stop_at_exit() {
            if let Some(e) = ENGINE.get() {
                e.shutdown();
            }
        }
        // SAFETY: registering a plain function with the C runtime's exit hooks.
        unsafe {
            libc::atexit(stop_at_exit);
        }
        DockerEngine::start().unwrap_or_else(|e| panic!("starting the test Docker engine: {e}"))
    })
}

/// The node (containerd, kubelet, kube-controller-manager, kube-scheduler) joined to the shared
/// control plane, started on first use and stopped at exit before the control plane. Opt-in: only
/// the tests that run pods call it.
pub fn node() -> &'static sandbox_operator::testenv::node::Node {
    use sandbox_operator::testenv::node::Node;
    static NODE: OnceLock<Node> = OnceLock::new();
    let cp = control_plane();
    NODE.get_or_init(|| {
        // Registered after the control plane's hook, so it runs before it (exit hooks run in
        // reverse): the kubelet stops while the API server still answers.
        extern "C" fn stop_at_exit() {
            if let Some(n) = NODE.get() {
                n.shutdown();
            }
        }
        // SAFETY: registering a plain function with the C runtime's exit hooks.
        unsafe {
            libc::atexit(stop_at_exit);
        }
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(Node::start(cp))
        })
        .join()
        .expect("node start-up thread")
        .unwrap_or_else(|e| panic!("starting the test node: {e}"))
    })
}

/// An admin client for the shared control plane, bound to the calling test's runtime.
pub async fn client() -> Client {
    control_plane().client().await.expect("admin client")
}

/// Creates a fresh namespace named after the test and returns its name.
pub async fn namespace(client: &Client, test: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(40);
    let name = format!("{}-{}-{n}", name.trim_matches('-'), std::process::id());
    let api: Api<Namespace> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .expect("creating the test namespace");
    name
}

/// Runs kubectl against the shared control plane, feeding `stdin` when given.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    let cp = control_plane();
    let mut cmd = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()));
    cmd.arg("--kubeconfig").arg(cp.kubeconfig_path()).args(args);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("running kubectl (is it installed?)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("writing kubectl stdin");
    }
    child.wait_with_output().expect("waiting for kubectl")
}

/// kubectl's output as text: stdout then stderr.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A `sandbox-operator run` process watching one namespace, as users run it, with short
/// intervals so tests move quickly. Killed (SIGKILL) when dropped.
pub struct Operator {
    child: Option<std::process::Child>,
    /// Its combined log.
    pub log: std::path::PathBuf,
    /// Its HTTP address (`/metrics`, `/healthz`).
    pub http: std::net::SocketAddr,
    /// Its ledger (a SQLite file of its own).
    pub ledger: String,
    _dir: tempfile::TempDir,
}

impl Operator {
    /// Starts the operator for `namespace` against the EC2 endpoint at `ec2_url`.
    pub fn start(namespace: &str, ec2_url: &str, extra: &[&str]) -> Operator {
        let dir = tempfile::tempdir().expect("operator dir");
        let log = dir.path().join("operator.log");
        Self::start_logging_to(namespace, ec2_url, extra, dir, log)
    }

    fn start_logging_to(
        namespace: &str,
        ec2_url: &str,
        extra: &[&str],
        dir: tempfile::TempDir,
        log: std::path::PathBuf,
    ) -> Operator {
        let cp = control_plane();
        let port = sandbox_operator::testenv::free_port();
        let http: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandbox-operator"));
        cmd.arg("run")
            .args([
                "--namespace",
                namespace,
                "--ec2-endpoint",
                ec2_url,
                "--http-addr",
                &http.to_string(),
            ])
            .args(
                [
                    ["--ec2-refresh", "1s"],
                    ["--ec2-batch-window", "50ms"],
                    ["--poll", "500ms"],
                    ["--resync", "20s"],
                    ["--orphan-sweep", "1s"],
                    ["--orphan-grace", "3s"],
                    ["--region", "us-east-1"],
                ]
                .into_iter()
                // A flag given in `extra` replaces the test default.
                .filter(|[flag, _]| !extra.contains(flag))
                .flatten(),
            )
            .args(extra)
            .env("KUBECONFIG", cp.kubeconfig_path())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("SANDBOX_OPERATOR_LOG", "info,sandbox_operator=debug")
            .env(
                "SANDBOX_OPERATOR_LEDGER",
                format!("sqlite://{}", dir.path().join("ledger.db").display()),
            );
        let child = sandbox_operator::testenv::process::spawn_tied(cmd, &log)
            .expect("starting sandbox-operator");
        let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
        Operator {
            child: Some(child),
            log,
            http,
            ledger,
            _dir: dir,
        }
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again with the same settings, appending to the same log.
    pub fn restart(mut self, namespace: &str, ec2_url: &str, extra: &[&str]) -> Operator {
        self.kill();
        let dir = std::mem::replace(&mut self._dir, tempfile::tempdir().expect("dir"));
        let log = self.log.clone();
        Self::start_logging_to(namespace, ec2_url, extra, dir, log)
    }

    /// Its log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its `/metrics` text.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.http);
        for _ in 0..50 {
            if let Ok(r) = reqwest::get(&url).await {
                return r.text().await.unwrap_or_default();
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("no /metrics at {url}; log:\n{}", self.logs());
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- sandbox-operator log ----\n{}", self.logs());
        }
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `secs` seconds.
/// Like [`eventually`], but answers `None` at the deadline instead of failing, so the caller
/// can say what was missing.
pub async fn try_eventually<T, F, Fut>(secs: u64, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if std::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Every form in which a value may travel: itself, trimmed, as a JSON string's content, as the
/// `.env` file's double-quoted content (and that as JSON), each line of a multi-line value (and
/// its escaped forms), and base64. Computed here from the encoders themselves, independently of
/// the operator's redaction. Forms shorter than 6 characters are not searched (they would be
/// found by chance).
pub fn leak_forms(value: &str) -> Vec<String> {
    use base64::Engine as _;
    fn json(s: &str) -> String {
        let j = serde_json::to_string(s).unwrap();
        j[1..j.len() - 1].to_string()
    }
    fn env(s: &str) -> String {
        let r = sandbox_operator::agent::envfile::render_value(s);
        r.strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .unwrap_or(&r)
            .to_string()
    }
    let mut parts = vec![value.to_string(), value.trim().to_string()];
    if value.contains('\n') {
        parts.extend(value.split('\n').map(|l| l.trim().to_string()));
    }
    let mut forms = Vec::new();
    for p in parts {
        forms.push(json(&p));
        forms.push(env(&p));
        forms.push(json(&env(&p)));
        forms.push(p);
    }
    forms.push(base64::engine::general_purpose::STANDARD.encode(value));
    forms.retain(|f| f.chars().count() >= 6);
    forms.sort();
    forms.dedup();
    forms
}

/// Each form ([`leak_forms`]) of each named canary found in each place (name, text), with the
/// line it is on.
pub fn find_leaks(canaries: &[(&str, String)], places: &[(String, String)]) -> Vec<String> {
    let mut leaks = Vec::new();
    for (key, value) in canaries {
        for form in leak_forms(value) {
            for (place, text) in places {
                if let Some(line) = text.lines().find(|l| l.contains(&form)) {
                    leaks.push(format!(
                        "{key} as {form:?} in {place}: {}",
                        line.chars().take(600).collect::<String>()
                    ));
                }
            }
        }
    }
    leaks
}
