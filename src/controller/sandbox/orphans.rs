//! The orphan sweep: instances the operator tagged whose Sandbox no longer exists.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use kube::ResourceExt;
use kube::runtime::reflector::Store;
use tracing::warn;

use super::Context;
use crate::api::Sandbox;
use crate::ec2::{self, InstanceState};

/// Finds instances the operator tagged whose Sandbox no longer exists: counts them, logs them,
/// and terminates those it launched once they have been orphaned for the grace period.
pub(super) async fn sweep(ctx: Arc<Context>, namespace: Option<String>, store: Store<Sandbox>) {
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(ctx.settings.orphan_sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // An instance is only called an orphan against a complete list: the store once its first
    // list is in (after a re-list it swaps the whole list in at once). The grace period covers
    // the moment a watch lags behind.
    if let Err(e) = crate::controller::sandboxes::wait_ready(&store).await {
        warn!(error = %e, "orphan sweep: the Sandbox store never filled; no sweeps");
        return;
    }
    loop {
        tick.tick().await;
        let uids: std::collections::HashSet<String> =
            store.state().iter().filter_map(|s| s.uid()).collect();
        let instances = match ctx.ec2.list_managed_at_next_refresh().await {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "orphan sweep: listing tagged instances failed");
                continue;
            }
        };
        tracing::debug!(
            instances = instances.len(),
            sandboxes = uids.len(),
            "orphan sweep"
        );
        let mut orphans = 0;
        let mut seen = std::collections::HashSet::new();
        for inst in instances {
            if matches!(
                inst.state,
                InstanceState::Terminated | InstanceState::ShuttingDown
            ) {
                continue;
            }
            let Some(uid) = inst.tags.get(ec2::TAG_UID) else {
                continue;
            };
            if uids.contains(uid) {
                continue;
            }
            // Watching one namespace, the operator knows only that namespace's Sandboxes.
            if let Some(ns) = &namespace
                && inst.tags.get(ec2::TAG_NAMESPACE) != Some(ns)
            {
                continue;
            }
            orphans += 1;
            seen.insert(inst.id.clone());
            let since = *first_seen
                .entry(inst.id.clone())
                .or_insert_with(Instant::now);
            let owner = format!(
                "{}/{}",
                inst.tags
                    .get(ec2::TAG_NAMESPACE)
                    .map(String::as_str)
                    .unwrap_or("?"),
                inst.tags
                    .get(ec2::TAG_NAME)
                    .map(String::as_str)
                    .unwrap_or("?")
            );
            match ctx.settings.orphan_grace {
                Some(grace) if since.elapsed() >= grace => {
                    match ctx.ec2.terminate(&inst.id).await {
                        Ok(()) => {
                            warn!(instance = %inst.id, sandbox = %owner, "terminated an orphaned instance (its Sandbox is gone)")
                        }
                        Err(e) => {
                            warn!(instance = %inst.id, error = %e, "terminating an orphaned instance failed")
                        }
                    }
                }
                _ => {
                    warn!(instance = %inst.id, sandbox = %owner, "orphaned instance: tagged by the operator, but its Sandbox is gone")
                }
            }
        }
        first_seen.retain(|id, _| seen.contains(id));
        ctx.metrics.orphans.set(orphans);
    }
}
