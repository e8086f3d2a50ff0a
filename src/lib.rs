//! sandbox-operator: runs a fleet of EC2 browser-worker machines ("sandboxes") from declared state.
//!
//! The crate is laid out so the architecture shows:
//! - [`api`]: the custom resources (`Sandbox`, `SandboxDeploy`, `SecretBundle`) and their CRDs;
//! - [`agent`]: what the operator and the on-instance agent share (protocol, client, env file),
//!   and the agent daemon itself in [`agent::daemon`];
//! - [`controller`]: the controllers, each a pure `decide` module and a thin reconcile edge;
//! - `ec2`: the EC2 layer (one shared, batched, rate-limited view of the instances);
//! - [`operator`]: the process: `sandbox-operator run` wiring, the CI webhook
//!   ([`operator::webhook`]), leader election ([`operator::leader`]) and notifications
//!   ([`operator::notify`]);
//! - [`import`]: `sandbox-operator import`: Sandbox manifests for a fleet that already runs, from
//!   the old admin database's `sandboxes` table or from EC2 tags;
//! - [`redact`]: one masking of secrets in every encoding, shared by the agent and the operator;
//! - [`metrics`]: the Prometheus metrics;
//! - [`util`]: small shared pieces (durations, TLS set-up);
//! - `testenv` (feature `testenv`): the local control plane, EC2 endpoint and agents that the
//!   tests, `make demo` and `make bench` run against; the only place `unsafe` is allowed (each
//!   use marked with `#[allow(unsafe_code)]`), and forbidden everywhere in a build without it.

#![cfg_attr(not(feature = "testenv"), forbid(unsafe_code))]

pub mod agent;
pub mod api;
pub mod controller;
pub mod ec2;
pub mod import;
pub mod ledger;
pub mod metrics;
pub mod operator;
pub mod redact;
pub mod util;

#[cfg(feature = "testenv")]
pub mod testenv;
