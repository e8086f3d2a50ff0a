//! The SandboxDeploy controller: rolls an image tag across selected Sandboxes in waves.

pub mod decide;
