//! The sandbox agent: the program on each instance that the operator talks to (DESIGN.md section 2).
//!
//! It replaces the seeds' `health-server.js` and `gh-deploy.sh` and speaks a superset of their HTTP
//! protocol, so the operator also works with instances that still run the old health server.
//!
//! What the operator and the daemon share:
//! - [`protocol`]: the JSON types shared by the server and the client;
//! - [`client`]: the operator-side client ([`client::AgentClient`]);
//! - [`envfile`]: env-file parsing, validation, rendering and atomic writes.
//!
//! The program on each instance (binary `sandbox-agent`) is in [`daemon`].

pub mod client;
pub mod daemon;
pub mod envfile;
pub mod protocol;

pub use client::{AgentClient, AgentError, AgentToken};
pub use protocol::HealthReport;
