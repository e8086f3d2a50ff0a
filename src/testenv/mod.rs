//! The local test environment: a real kube-apiserver and etcd, the wrapped moto EC2 endpoint,
//! a real Docker engine with a registry (see [`docker`]), started on free loopback ports and
//! stopped when the owning value is dropped (or, at the
//! latest, when the process that started them exits).

pub mod controlplane;
pub mod docker;
pub mod ec2;
pub mod node;
pub mod postgres;
pub mod process;

pub use controlplane::{
    ControlPlane, ControlPlaneError, ControlPlaneOptions, cache_dir, free_port,
};
