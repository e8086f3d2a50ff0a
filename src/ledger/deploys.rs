//! Deploy history: the deploy_step events folded into one record per deploy, per environment.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::Serialize;

use super::db::StoredEvent;
use super::event::{DeployStepEvent, LedgerEvent, Outcome};

/// Where one target sandbox got to.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct TargetRecord {
    /// The Sandbox.
    pub sandbox: String,
    /// Its last step (Succeeded, Failed, RolledBack, Deferred, or one under way).
    pub step: String,
    /// That step's outcome.
    pub outcome: Outcome,
    /// The tag it came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_tag: Option<String>,
    /// The last message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When it got there.
    pub at: Timestamp,
}

/// One deploy of one tag: a SandboxDeploy, or a single sandbox's deploy by its own controller.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct DeployRecord {
    /// The namespace.
    pub namespace: String,
    /// The SandboxDeploy (unset: a one-off deploy to the single target).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deploy: Option<String>,
    /// The tag.
    pub tag: String,
    /// Succeeded, Failed, Progressing, or the deploy's own last phase (Halted, Aborted, ...).
    pub phase: String,
    /// The first step's time.
    pub started_at: Timestamp,
    /// The last step's time, once the deploy is over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// Target sandboxes.
    pub targets: usize,
    /// Targets that ended Succeeded.
    pub succeeded: usize,
    /// Targets that ended Failed.
    pub failed: usize,
    /// Targets that were rolled back.
    pub rolled_back: usize,
    /// Per target, by name.
    pub sandboxes: Vec<TargetRecord>,
}

/// One environment's deploys, newest first.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct EnvironmentDeploys {
    /// `dev`, `staging`, `prod` (`-` when the events did not say).
    pub environment: String,
    /// Newest first.
    pub deploys: Vec<DeployRecord>,
}

/// `report deploys`.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct DeployHistory {
    /// Only deploy steps from this time on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// dev, staging, prod, then any other.
    pub environments: Vec<EnvironmentDeploys>,
}

const TARGET_DONE: &[&str] = &["Succeeded", "Failed", "RolledBack", "Deferred"];
const DEPLOY_DONE: &[&str] = &["Succeeded", "Failed", "Halted", "Aborted", "Superseded"];

#[derive(Default)]
struct Acc {
    started: Option<Timestamp>,
    last: Option<Timestamp>,
    deploy_phase: Option<String>,
    targets: BTreeMap<String, TargetRecord>,
    seq: i64,
}

fn env_rank(env: &str) -> (usize, String) {
    let rank = ["dev", "staging", "prod"]
        .iter()
        .position(|e| *e == env)
        .unwrap_or(3);
    (rank, env.to_string())
}

/// Folds deploy steps (in the order stored) into deploy records; at most `limit` per
/// environment, newest first; only `environment` when given.
pub fn fold(
    events: &[StoredEvent],
    since: Option<Timestamp>,
    environment: Option<&str>,
    limit: usize,
) -> DeployHistory {
    // (environment, namespace, deploy or "", tag, sandbox for one-offs)
    type Key = (String, String, Option<String>, String, Option<String>);
    let mut deploys: BTreeMap<Key, Acc> = BTreeMap::new();
    for stored in events {
        let LedgerEvent::DeployStep(e) = &stored.event else {
            continue;
        };
        let env = e.environment.map_or("-", |v| v.as_str()).to_string();
        if environment.is_some_and(|want| want != env) {
            continue;
        }
        let one_off = if e.deploy.is_none() {
            e.sandbox.clone()
        } else {
            None
        };
        let key = (
            env,
            e.namespace.clone(),
            e.deploy.clone(),
            e.tag.clone(),
            one_off,
        );
        let acc = deploys.entry(key).or_default();
        apply(acc, e, stored.id);
    }
    let mut by_env: BTreeMap<(usize, String), Vec<(i64, DeployRecord)>> = BTreeMap::new();
    for ((env, namespace, deploy, tag, _), acc) in deploys {
        let record = finish(namespace, deploy, tag, &acc);
        by_env
            .entry(env_rank(&env))
            .or_default()
            .push((acc.seq, record));
    }
    DeployHistory {
        since,
        environments: by_env
            .into_iter()
            .map(|((_, environment), mut records)| {
                records.sort_by_key(|(seq, r)| std::cmp::Reverse((r.started_at, *seq)));
                records.truncate(limit);
                EnvironmentDeploys {
                    environment,
                    deploys: records.into_iter().map(|(_, r)| r).collect(),
                }
            })
            .collect(),
    }
}

fn apply(acc: &mut Acc, e: &DeployStepEvent, id: i64) {
    acc.started = Some(acc.started.map_or(e.at, |s| s.min(e.at)));
    acc.last = Some(acc.last.map_or(e.at, |s| s.max(e.at)));
    acc.seq = id;
    match &e.sandbox {
        Some(sandbox) => {
            let previous = acc
                .targets
                .get(sandbox)
                .and_then(|t| t.previous_tag.clone());
            acc.targets.insert(
                sandbox.clone(),
                TargetRecord {
                    sandbox: sandbox.clone(),
                    step: e.step.clone(),
                    outcome: e.outcome,
                    previous_tag: e.previous_tag.clone().or(previous),
                    message: e.message.clone(),
                    at: e.at,
                },
            );
        }
        None => acc.deploy_phase = Some(e.step.clone()),
    }
}

fn finish(namespace: String, deploy: Option<String>, tag: String, acc: &Acc) -> DeployRecord {
    let count = |step: &str| acc.targets.values().filter(|t| t.step == step).count();
    let (succeeded, failed, rolled_back) =
        (count("Succeeded"), count("Failed"), count("RolledBack"));
    let targets_done = acc
        .targets
        .values()
        .all(|t| TARGET_DONE.contains(&t.step.as_str()));
    let phase = match &acc.deploy_phase {
        Some(p) => p.clone(),
        None if !targets_done => "Progressing".to_string(),
        None if failed + rolled_back > 0 => "Failed".to_string(),
        None => "Succeeded".to_string(),
    };
    let done =
        DEPLOY_DONE.contains(&phase.as_str()) && (acc.deploy_phase.is_some() || targets_done);
    DeployRecord {
        namespace,
        deploy,
        tag,
        started_at: acc.started.unwrap_or(Timestamp::UNIX_EPOCH),
        finished_at: if done { acc.last } else { None },
        phase,
        targets: acc.targets.len(),
        succeeded,
        failed,
        rolled_back,
        sandboxes: acc.targets.values().cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Environment;

    fn step(
        id: i64,
        min: i64,
        env: Environment,
        deploy: Option<&str>,
        sandbox: Option<&str>,
        tag: &str,
        step: &str,
    ) -> StoredEvent {
        let at: Timestamp = "2024-06-01T00:00:00Z".parse().unwrap();
        StoredEvent {
            id,
            event: LedgerEvent::DeployStep(DeployStepEvent {
                at: at + jiff::SignedDuration::from_mins(min),
                namespace: "fleet".into(),
                deploy: deploy.map(Into::into),
                sandbox: sandbox.map(Into::into),
                environment: Some(env),
                tag: tag.into(),
                previous_tag: Some("v1".into()),
                step: step.into(),
                outcome: match step {
                    "Failed" => Outcome::Failed,
                    "Succeeded" | "RolledBack" => Outcome::Succeeded,
                    _ => Outcome::Started,
                },
                message: None,
            }),
        }
    }

    #[test]
    fn folds_steps_into_deploys_per_environment() {
        use Environment::*;
        let events = vec![
            step(1, 0, Prod, Some("d2"), Some("a"), "v2", "Draining"),
            step(2, 1, Prod, Some("d2"), Some("b"), "v2", "Draining"),
            step(3, 2, Prod, Some("d2"), Some("a"), "v2", "Succeeded"),
            step(4, 3, Prod, Some("d2"), Some("b"), "v2", "Failed"),
            step(5, 4, Prod, Some("d2"), Some("b"), "v2", "RolledBack"),
            step(6, 5, Prod, Some("d2"), None, "v2", "Halted"),
            step(7, 6, Staging, None, Some("s"), "v3", "Deploying"),
            step(8, 10, Prod, Some("d3"), Some("a"), "v3", "Deploying"),
            step(9, 11, Staging, None, Some("s"), "v3", "Succeeded"),
        ];
        let h = fold(&events, None, None, 50);
        let envs: Vec<&str> = h
            .environments
            .iter()
            .map(|e| e.environment.as_str())
            .collect();
        assert_eq!(envs, ["staging", "prod"]);
        let prod = &h.environments[1].deploys;
        assert_eq!(prod.len(), 2);
        assert_eq!(prod[0].deploy.as_deref(), Some("d3"), "newest first");
        assert_eq!(prod[0].phase, "Progressing");
        assert_eq!(prod[0].finished_at, None);
        let d2 = &prod[1];
        assert_eq!(d2.phase, "Halted");
        assert_eq!(
            (d2.targets, d2.succeeded, d2.failed, d2.rolled_back),
            (2, 1, 0, 1)
        );
        assert!(d2.finished_at.is_some());
        let staging = &h.environments[0].deploys;
        assert_eq!(staging[0].phase, "Succeeded");
        assert_eq!(staging[0].deploy, None);
        assert_eq!(staging[0].sandboxes[0].sandbox, "s");

        let only = fold(&events, None, Some("staging"), 50);
        assert_eq!(only.environments.len(), 1);
        let limited = fold(&events, None, Some("prod"), 1);
        assert_eq!(limited.environments[0].deploys.len(), 1);
    }
}
