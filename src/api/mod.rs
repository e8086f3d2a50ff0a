//! The custom resources of `fleet.valet.dev/v1alpha1` and the CRDs generated from them.
//!
//! Every field carries a doc comment: it becomes the `kubectl explain` text. Invariants the API
//! server can check are CEL rules (`x-kubernetes-validations`), so `kubectl apply` refuses bad
//! input with a message that says what to fix. Every string, list and map a rule touches is bounded
//! so the rules stay within the API server's cost budget.

// kube's `printcolumn(...)` attributes repeat keys such as `type_` by design.
#![allow(clippy::duplicated_attributes)]

pub mod common;
pub mod conditions;
pub mod deploy;
pub mod pool;
pub mod sandbox;
pub mod sandbox_conditions;
pub mod sandbox_events;
pub mod secretbundle;
pub mod selector;

pub use common::*;
pub use deploy::*;
pub use pool::*;
pub use sandbox::*;
pub use secretbundle::*;
pub use selector::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every resource here.
pub const GROUP: &str = "fleet.valet.dev";
/// The API version of every resource here.
pub const VERSION: &str = "v1alpha1";

/// The CRDs of the resources, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        Sandbox::crd(),
        SandboxDeploy::crd(),
        SandboxPool::crd(),
        SecretBundle::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream, exactly as `crds/` holds them.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// The file name under `crds/` for one CRD.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}
