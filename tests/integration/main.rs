//! The one integration test binary: one control plane and one EC2 endpoint shared by every test
//! (each test works in its own namespace), stopped when the binary exits.

// The tests are part of the test environment: they call libc (atexit, signals, rusage).
#![allow(unsafe_code)]

mod support;

mod agent;
mod agent_engine;
mod bootstrap;
mod chart_node;
mod crds;
mod deploy;
mod ec2_endpoint;
mod ec2_layer;
mod engine;
mod fleet;
mod import;
mod ledger;
mod legacy;
mod notify;
mod outage;
mod pool;
mod release;
mod sandbox;
mod secretbundle;
mod ship;
mod testenv;
mod validation;
