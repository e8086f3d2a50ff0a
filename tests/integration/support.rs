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
