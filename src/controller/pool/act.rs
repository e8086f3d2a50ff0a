//! Carries out what [`super::decide`] chose: creates, starts, drains and deletes members, sets
//! the template's tag and the autoscaler's replicas.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};

use super::Error;
use crate::api::{
    ACTION_ANNOTATION, ACTION_ID_ANNOTATION, AUTOSCALE_FIELD_MANAGER, DEPLOY_FIELD_MANAGER,
    POOL_FIELD_MANAGER, PowerState, RETIRING_ANNOTATION, Sandbox, SandboxPool,
};

fn kube_err(what: String, pool: &SandboxPool) -> impl FnOnce(kube::Error) -> Error {
    let object = format!(
        "{}/{}",
        pool.namespace().unwrap_or_default(),
        pool.name_any()
    );
    move |source| Error::Kube {
        what,
        object,
        source,
    }
}

/// Creates one member from the template: generated name `<pool>-`, the pool as its
/// controlling owner, the template's labels plus the pool and template-hash labels.
pub async fn create(
    api: &Api<Sandbox>,
    pool: &SandboxPool,
    hash: &str,
    standby: bool,
) -> Result<Sandbox, Error> {
    let mut spec = pool.spec.template.spec.clone();
    spec.power_state = if standby {
        PowerState::Stopped
    } else {
        PowerState::Running
    };
    let mut s = Sandbox::new("", spec);
    s.metadata.name = None;
    s.metadata.generate_name = Some(format!("{}-", pool.name_any()));
    s.metadata.labels = Some(super::observe::member_labels(pool, hash));
    s.metadata.owner_references = Some(vec![OwnerReference {
        api_version: SandboxPool::api_version(&()).into_owned(),
        kind: SandboxPool::kind(&()).into_owned(),
        name: pool.name_any(),
        uid: pool.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    let pp = PostParams {
        field_manager: Some(POOL_FIELD_MANAGER.into()),
        ..Default::default()
    };
    api.create(&pp, &s)
        .await
        .map_err(kube_err("creating a member".into(), pool))
}

fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(POOL_FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// Starts a standby member.
pub async fn start(api: &Api<Sandbox>, pool: &SandboxPool, name: &str) -> Result<(), Error> {
    let patch = serde_json::json!({"spec": {"powerState": "Running"}});
    api.patch(name, &merge_params(), &Patch::Merge(&patch))
        .await
        .map_err(kube_err(format!("starting standby member {name}"), pool))?;
    Ok(())
}

/// Marks a member as being removed and, with `drain`, asks its worker to drain (the
/// Sandbox's day-2 `drain` action).
pub async fn retire(
    api: &Api<Sandbox>,
    pool: &SandboxPool,
    name: &str,
    drain: bool,
    now: Timestamp,
) -> Result<(), Error> {
    let mut annotations = serde_json::Map::new();
    annotations.insert(RETIRING_ANNOTATION.into(), now.to_string().into());
    if drain {
        annotations.insert(ACTION_ANNOTATION.into(), "drain".into());
        annotations.insert(
            ACTION_ID_ANNOTATION.into(),
            format!("pool-retire-{}", now.as_second()).into(),
        );
    }
    let patch = serde_json::json!({"metadata": {"annotations": annotations}});
    api.patch(name, &merge_params(), &Patch::Merge(&patch))
        .await
        .map_err(kube_err(format!("draining member {name}"), pool))?;
    Ok(())
}

/// Deletes a member; its instance goes the way its deletion policy says (the Sandbox
/// controller's finalizer). Gone already is done.
pub async fn delete(api: &Api<Sandbox>, pool: &SandboxPool, name: &str) -> Result<(), Error> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(kube_err(format!("deleting member {name}"), pool)(e)),
    }
}

/// Sets the template's image tag, under the field manager SandboxDeploys set Sandboxes' tags
/// with.
pub async fn set_template_tag(
    api: &Api<SandboxPool>,
    pool: &SandboxPool,
    tag: &str,
) -> Result<SandboxPool, Error> {
    let patch = serde_json::json!({
        "apiVersion": "fleet.valet.dev/v1alpha1",
        "kind": "SandboxPool",
        "metadata": {"name": pool.name_any()},
        "spec": {"template": {"spec": {"image": {"tag": tag}}}},
    });
    api.patch(
        &pool.name_any(),
        &PatchParams::apply(DEPLOY_FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(kube_err(
        format!("setting the template's image tag to {tag}"),
        pool,
    ))
}

/// Sets `spec.replicas` for the autoscaler.
pub async fn set_replicas(
    api: &Api<SandboxPool>,
    pool: &SandboxPool,
    replicas: i32,
) -> Result<SandboxPool, Error> {
    let patch = serde_json::json!({"spec": {"replicas": replicas}});
    api.patch(
        &pool.name_any(),
        &PatchParams {
            field_manager: Some(AUTOSCALE_FIELD_MANAGER.into()),
            ..Default::default()
        },
        &Patch::Merge(&patch),
    )
    .await
    .map_err(kube_err(
        format!("autoscaling to {replicas} replicas"),
        pool,
    ))
}
