//! The sandbox agent: the program on each instance that the operator talks to (DESIGN.md section 2).
//!
//! It replaces the seeds' `health-server.js` and `gh-deploy.sh` and speaks a superset of their HTTP
//! protocol, so the operator also works with instances that still run the old health server.
//!
//! - [`protocol`]: the JSON types shared by the server and the client;
//! - [`client`]: the operator-side client ([`client::AgentClient`]);
//! - [`server`]: the agent's routes, auth, limits and background tasks (binary `sandbox-agent`);
//! - [`deploy`]: the deploy state machine (pull, drain, stop, up, health check, rollback);
//! - [`checks`], [`metrics`], [`worker`]: what `/health` reports and how it is gathered;
//! - [`envfile`]: env-file parsing, validation, rendering and atomic writes;
//! - [`config`]: the YAML configuration and the command line;
//! - [`exec`]: running commands with limits, and redacting secrets from their output;
//! - [`containers`]: the registry login, the targeted workers, recreating compose services, what
//!   the engine runs.

pub mod checks;
pub mod client;
pub mod config;
pub mod containers;
pub mod deploy;
pub mod envfile;
pub mod exec;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod services;
pub mod worker;

pub use client::{AgentClient, AgentError, AgentToken};
pub use protocol::HealthReport;
