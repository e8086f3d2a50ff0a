//! The daemon on each instance (binary `sandbox-agent`). The operator's binary links none of it
//! except through the shared [`crate::agent::protocol`] and [`crate::agent::envfile`].
//!
//! - [`server`]: the agent's routes, auth, limits and background tasks;
//! - [`deploy`]: the deploy state machine (pull, drain, stop, up, health check, rollback);
//! - [`checks`], [`metrics`], [`worker`]: what `/health` reports and how it is gathered;
//! - [`config`]: the YAML configuration and the command line;
//! - [`exec`]: running commands with limits, and redacting secrets from their output;
//! - [`containers`]: the registry login, the targeted workers, recreating compose services, what
//!   the engine runs;
//! - [`services`]: the host's services (AdsPower and the like).

pub mod checks;
pub mod config;
pub mod containers;
pub mod deploy;
pub mod exec;
pub mod metrics;
pub mod server;
pub mod services;
pub mod worker;
