//! `sandbox-testenv`: the local environment the tests use, for people and scripts: a real
//! kube-apiserver and etcd with the CRDs installed, and the wrapped moto EC2 endpoint, on free
//! loopback ports. Prints one JSON line describing them, then runs until SIGINT, SIGTERM or (with
//! `--exit-on-stdin-eof`) the end of its input; everything it started stops with it.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions};
use sandbox_operator::testenv::{ControlPlane, ControlPlaneOptions};

/// Start a local control plane and EC2 endpoint (needs `make tools` first).
#[derive(Parser, Debug)]
#[command(name = "sandbox-testenv", version, about)]
struct Args {
    /// Also write the admin kubeconfig here (it is always in the control plane's directory).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// How long instances stay pending, stopping and shutting-down at the EC2 endpoint.
    #[arg(long, default_value = "2s", value_parser = |s: &str| sandbox_operator::util::parse_duration(s).map_err(|e| e.to_string()))]
    transitions: Duration,
    /// Start the EC2 endpoint with AWS-like request throttling on.
    #[arg(long)]
    throttle: bool,
    /// Exit when standard input closes (for a parent process that wants it gone with it).
    #[arg(long)]
    exit_on_stdin_eof: bool,
}

fn main() -> std::process::ExitCode {
    sandbox_operator::util::install_crypto_provider();
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new().expect("starting the async runtime");
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandbox-testenv: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Handlers first: a signal that comes as soon as the line below is read must be handled.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let started = Instant::now();
    let (cp, ec2) = tokio::join!(
        ControlPlane::start(ControlPlaneOptions::default()),
        Ec2Endpoint::start(Ec2EndpointOptions {
            throttle: args.throttle,
            ..Ec2EndpointOptions::default().with_transitions(args.transitions)
        })
    );
    let (cp, ec2) = (cp?, ec2?);
    if let Some(path) = &args.kubeconfig {
        std::fs::copy(cp.kubeconfig_path(), path)?;
    }
    let mut pids = cp.pids();
    pids.push(ec2.pid());
    let info = serde_json::json!({
        "kubeconfig": args.kubeconfig.as_deref().unwrap_or(cp.kubeconfig_path()),
        "server": cp.server(),
        "ec2Endpoint": ec2.url(),
        "pids": pids,
        "controlPlaneStartupMs": cp.startup.as_millis() as u64,
        "startupMs": started.elapsed().as_millis() as u64,
    });
    println!("{info}");
    let stdin_eof = async {
        if args.exit_on_stdin_eof {
            let mut buf = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut buf).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = stdin_eof => {}
    }
    drop(ec2);
    cp.shutdown();
    Ok(())
}
