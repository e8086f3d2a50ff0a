//! `sandbox-bench`: the fleet benchmark behind `make bench` (issue 9; DESIGN.md section 6).
//!
//! Starts a local control plane, wrapped moto EC2 endpoints with AWS-like throttling and
//! virtual agents, runs the real `sandbox-operator` binary (found next to this one) against
//! them, and prints each figure beside its target; the results also go to JSON
//! (`target/bench/results.json` by default) with the operator's and the endpoint's logs beside
//! it. When that file already holds an earlier run's results, each figure is printed as
//! `new (previous: old, ratio x)`. Exits non-zero only when something could not run, never because a target was missed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

mod agents;
mod config;
mod fleet;
mod operator;
mod report;
mod scenarios;

use clap::Parser;
use config::Config;

/// The fleet benchmark (needs `make tools`; run it through `make bench`).
#[derive(Parser, Debug)]
#[command(name = "sandbox-bench", version, about)]
struct Args {
    /// Smaller sizes and shorter windows: a smoke run of every scenario in a few minutes.
    #[arg(long)]
    quick: bool,
    /// Only these scenarios (converge, steady, reaction, rollout, memory, first-status, pool),
    /// comma-separated.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Fleet sizes for the converge scenario (the first also serves steady, reaction, rollout).
    #[arg(long, value_delimiter = ',')]
    converge: Vec<usize>,
    /// Sandboxes in the large steady-state fleet.
    #[arg(long)]
    steady: Option<usize>,
    /// The steady-state measuring window.
    #[arg(long, value_parser = duration)]
    steady_window: Option<Duration>,
    /// Spec changes for the reaction scenario.
    #[arg(long)]
    changes: Option<usize>,
    /// maxUnavailable of the rollout.
    #[arg(long)]
    max_unavailable: Option<usize>,
    /// Per-sandbox deploy time at the virtual agents.
    #[arg(long, value_parser = duration)]
    deploy_time: Option<Duration>,
    /// Sandbox counts for the memory scenario, comma-separated.
    #[arg(long, value_delimiter = ',')]
    memory: Vec<usize>,
    /// Sandboxes applied at once by the first-status scenario.
    #[arg(long)]
    first_status: Option<usize>,
    /// The size the pool scenario scales a SandboxPool to from 0.
    #[arg(long)]
    pool: Option<usize>,
    /// Record a perf profile of the operator during the large steady window.
    #[arg(long)]
    perf: bool,
    /// Where to write the JSON results (logs go beside it).
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
}

fn duration(s: &str) -> Result<Duration, String> {
    sandbox_operator::util::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> std::process::ExitCode {
    sandbox_operator::util::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANDBOX_BENCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let operator = match operator::operator_binary() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sandbox-bench: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut cfg = if args.quick {
        Config::quick(operator)
    } else {
        Config::full(operator)
    };
    if !args.converge.is_empty() {
        cfg.converge_sizes = args.converge;
    }
    if let Some(n) = args.steady {
        cfg.steady_size = n;
    }
    if let Some(d) = args.steady_window {
        cfg.steady_window = d;
    }
    if let Some(n) = args.changes {
        cfg.changes = n;
    }
    if let Some(n) = args.max_unavailable {
        cfg.max_unavailable = n;
    }
    if let Some(d) = args.deploy_time {
        cfg.deploy_time = d;
    }
    if !args.memory.is_empty() {
        cfg.memory_sizes = args.memory;
    }
    if let Some(n) = args.first_status {
        cfg.first_status_size = n;
    }
    if let Some(n) = args.pool {
        cfg.pool_size = n;
    }
    cfg.only = args.only;
    cfg.perf = args.perf;
    cfg.out = args.out;
    // The previous run's figures, read before this run overwrites its file.
    cfg.previous = match std::fs::read_to_string(&cfg.out) {
        Ok(text) => match report::Previous::parse(&text) {
            Ok(p) => {
                eprintln!(
                    "sandbox-bench: the previous run's figures ({}) are shown beside the new ones",
                    cfg.out.display()
                );
                Some(p)
            }
            Err(e) => {
                eprintln!(
                    "sandbox-bench: {} is not a results file ({e}); no comparison",
                    cfg.out.display()
                );
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            eprintln!(
                "sandbox-bench: reading the previous results {}: {e}; no comparison",
                cfg.out.display()
            );
            None
        }
    };
    let started = Instant::now();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandbox-bench: starting the async runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let out = cfg.out.clone();
    let result = rt.block_on(scenarios::run(cfg));
    rt.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(res) => {
            println!();
            println!(
                "sandbox-bench results ({:.0} s; JSON in {}):",
                started.elapsed().as_secs_f64(),
                out.display()
            );
            println!();
            print!("{}", res.table());
            if res.details.contains_key("incomplete") {
                eprintln!("sandbox-bench: some scenarios could not run (see the table)");
                std::process::ExitCode::from(1)
            } else {
                std::process::ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("sandbox-bench: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
