//! `sandbox-operator`: the operator process and its tools.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Runs a fleet of EC2 browser-worker sandboxes from declared state: Sandbox, SandboxDeploy and
/// SecretBundle resources in the fleet.valet.dev API group.
#[derive(Parser, Debug)]
#[command(name = "sandbox-operator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controllers and the HTTP server (/healthz, /readyz, /metrics).
    Run(Box<sandbox_operator::operator::RunArgs>),
    /// Print the CustomResourceDefinitions as YAML, or write one file per CRD into a directory.
    Crds {
        /// Write `<crd name>.yaml` files into this directory instead of printing to stdout.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Reports from the ledger: cost, fleet (the sandboxes table), deploy history.
    Report(sandbox_operator::ledger::ReportArgs),
    /// Sandbox manifests for a fleet that already runs, adopting each instance: from the old
    /// admin database's `sandboxes` table or from EC2 instances selected by tag.
    Import(Box<sandbox_operator::import::ImportArgs>),
}

fn main() -> ExitCode {
    sandbox_operator::util::install_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_tracing();
            let rt = tokio::runtime::Runtime::new().expect("starting the async runtime");
            match rt.block_on(sandbox_operator::operator::run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sandbox-operator run: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Report(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("starting the async runtime");
            match rt.block_on(sandbox_operator::ledger::run_report(args)) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sandbox-operator report: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Import(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("starting the async runtime");
            match rt.block_on(sandbox_operator::import::run(*args)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("sandbox-operator import: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Crds { dir } => match write_crds(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sandbox-operator crds: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn write_crds(dir: Option<PathBuf>) -> Result<(), Box<dyn std::error::Error>> {
    use sandbox_operator::api;
    match dir {
        None => print!("{}", api::crds_yaml()?),
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            for crd in api::crds() {
                let path = dir.join(api::crd_file_name(&crd));
                std::fs::write(&path, serde_yaml::to_string(&crd)?)?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("SANDBOX_OPERATOR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("SANDBOX_OPERATOR_LOG_FORMAT").is_ok_and(|f| f == "json");
    if json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
}
