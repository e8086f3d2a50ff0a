//! The controllers: each computes what to do from plain data in a pure `decide` module and
//! carries it out through thin edges (kube, EC2, the agent).

pub mod deploy;
pub mod sandbox;
pub mod secretbundle;
