//! The local environment itself: `sandbox-testenv` starts a working control plane and EC2
//! endpoint, and nothing it started outlives it, whether it is stopped or killed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn alive(pid: u32) -> bool {
    // A zombie (state Z) has exited; only its parent has not reaped it yet.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn wait_gone(pids: &[u32]) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start() -> (std::process::Child, serde_json::Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandbox-testenv"))
        .args(["--transitions", "0s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting sandbox-testenv");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("reading its first line");
    let info: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
    (child, info)
}

#[test]
fn testenv_works_and_leaves_nothing_when_killed() {
    let (mut child, info) = start();
    let pids: Vec<u32> = info["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        pids.len(),
        3,
        "kube-apiserver, etcd and the EC2 endpoint: {info}"
    );
    assert!(pids.iter().all(|p| alive(*p)), "{info}");
    // The control plane answers kubectl with the CRDs installed.
    let kubeconfig = info["kubeconfig"].as_str().unwrap();
    let out = Command::new("kubectl")
        .args(["--kubeconfig", kubeconfig, "get", "crd", "-o", "name"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("sandboxes.fleet.valet.dev"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = std::path::Path::new(kubeconfig)
        .parent()
        .unwrap()
        .to_path_buf();

    // SIGKILL: no clean-up code runs, yet the kernel ends every child.
    child.kill().unwrap();
    child.wait().unwrap();
    let left = wait_gone(&pids);
    assert!(
        left.is_empty(),
        "processes outlived a killed sandbox-testenv: {left:?}"
    );
    // Its files are swept by the next start (in this binary, the shared control plane's).
    let _ = crate::support::control_plane();
    sandbox_operator::testenv::process::sweep_stale_dirs("sandbox-operator-cp-");
    assert!(!dir.exists(), "{} was not swept", dir.display());
}

#[test]
fn testenv_stops_everything_on_sigterm() {
    let (mut child, info) = start();
    let pids: Vec<u32> = info["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect();
    let dir = std::path::Path::new(info["kubeconfig"].as_str().unwrap())
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(info["controlPlaneStartupMs"].as_u64().is_some());
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "sandbox-testenv exited with {status}");
    let left = wait_gone(&pids);
    assert!(
        left.is_empty(),
        "processes outlived sandbox-testenv: {left:?}"
    );
    assert!(!dir.exists(), "{} was not removed", dir.display());
}
