//! What the pool controller tells: an Event on the pool for each member created, started,
//! drained or deleted, each tag taken and each autoscale step.

use kube::Resource;
use kube::runtime::events::{Event, EventType};
use tracing::warn;

use super::Context;
use crate::api::SandboxPool;

/// Publishes one Event on the pool (a failure to publish is logged, never fatal).
pub async fn event(ctx: &Context, pool: &SandboxPool, warning: bool, reason: &str, note: String) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &pool.object_ref(&())).await {
        warn!(error = %e, "publishing a pool event failed");
    }
}
