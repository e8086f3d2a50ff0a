//! `sandbox-agent`: the program on each sandbox instance that the operator talks to.
//! See `sandbox-agent --help`, `examples/agent/` and `sandbox_operator::agent`.

#![forbid(unsafe_code)]

use clap::Parser;
use sandbox_operator::agent::daemon::config::{Cli, LogFormat};
use sandbox_operator::agent::daemon::server;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // One rustls provider for the whole process (several are compiled into the crate).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
    let cfg = match cli.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sandbox-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        match serde_yaml::to_string(&cfg) {
            Ok(y) => {
                print!("{y}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("sandbox-agent: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("sandbox-agent")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandbox-agent: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(server::run(cfg, cli.addr_file.clone())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "sandbox-agent stopped");
            eprintln!("sandbox-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
