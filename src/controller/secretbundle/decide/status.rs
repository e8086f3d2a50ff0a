//! The status step: the bundle's status (targets, counts, Ready and Degraded) from the
//! targets' standing after a round, or from the problems of an invalid spec.

use super::*;

/// A target as the summary sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Standing {
    /// Its status entry.
    pub entry: BundleTargetStatus,
    /// Whether it holds Ready back.
    pub blocks_ready: bool,
}

/// Builds the status from the targets' standing (content valid).
pub fn summarize(
    old: &SecretBundleStatus,
    generation: Option<i64>,
    content: &Content,
    targets: Vec<Standing>,
    invalid_credentials: &[String],
    now: Timestamp,
) -> SecretBundleStatus {
    let mut st = old.clone();
    st.observed_generation = generation;
    st.content_hash = Some(content.hash.clone());
    st.keys = content.vars.keys().cloned().collect();
    st.key_count = i32::try_from(content.vars.len()).unwrap_or(i32::MAX);
    st.total_targets = i32::try_from(targets.len()).unwrap_or(i32::MAX);
    st.synced_targets = i32::try_from(
        targets
            .iter()
            .filter(|t| t.entry.state == BundleTargetState::Synced)
            .count(),
    )
    .unwrap_or(i32::MAX);
    let names = |pred: &dyn Fn(&Standing) -> bool| -> Vec<String> {
        targets
            .iter()
            .filter(|t| pred(t))
            .map(|t| match t.entry.kind {
                BundleTargetKind::Sandbox => format!("sandbox {}", t.entry.name),
                BundleTargetKind::FlyApp => format!("Fly.io app {}", t.entry.name),
            })
            .collect()
    };
    let failed = names(&|t| t.entry.state == BundleTargetState::Failed);
    // The first failure's own words (scrubbed at the edge), so Ready says what went wrong:
    // "restarting worker: ..." is not "synced", whatever hash the agent reports.
    let first_failure = targets
        .iter()
        .find(|t| t.entry.state == BundleTargetState::Failed)
        .and_then(|t| t.entry.message.as_deref())
        .map(|m| excerpt(m, 300));
    let skipped = names(&|t| t.entry.state == BundleTargetState::Skipped);
    let waiting = names(&|t| t.entry.state == BundleTargetState::Pending && t.blocks_ready);
    let parked = names(&|t| t.entry.state == BundleTargetState::Pending && !t.blocks_ready);
    let staged = names(&|t| t.entry.state == BundleTargetState::Staged);
    let total = targets.len();
    // Staged targets hold the content too (in the app's secrets, not yet in its Machines).
    let synced = total - failed.len() - skipped.len() - waiting.len() - parked.len();
    // The one reason every failed (or every skipped) target shares, when they carry one: a
    // Fly.io API answer (FlyUnauthorized, FlyThrottled, ...) says more than SyncFailed.
    let shared_reason = |state: BundleTargetState| -> Option<String> {
        let mut reasons = targets
            .iter()
            .filter(|t| t.entry.state == state)
            .map(|t| t.entry.reason.clone());
        let first = reasons.next()??;
        reasons
            .all(|r| r.as_deref() == Some(&first))
            .then_some(first)
    };
    let failed_reason = shared_reason(BundleTargetState::Failed);
    let skipped_reason = shared_reason(BundleTargetState::Skipped);
    st.targets = targets.into_iter().map(|t| t.entry).collect();

    let hash = content.short_hash();
    let (status, why, message) = if !invalid_credentials.is_empty() {
        (
            FALSE,
            reason::INVALID_SPEC,
            format!(
                "{}; that target waits for an edit",
                list(invalid_credentials)
            ),
        )
    } else if !failed.is_empty() {
        (
            FALSE,
            failed_reason.as_deref().unwrap_or(reason::SYNC_FAILED),
            match &first_failure {
                Some(m) => format!(
                    "{} of {total} targets failed to take content {hash}: {} (first: {m})",
                    failed.len(),
                    list(&failed)
                ),
                None => format!(
                    "{} of {total} targets failed to take content {hash}: {}",
                    failed.len(),
                    list(&failed)
                ),
            },
        )
    } else if !waiting.is_empty() {
        (
            FALSE,
            reason::SYNCING,
            format!(
                "{synced} of {total} targets hold content {hash}; waiting for {}",
                list(&waiting)
            ),
        )
    } else if total == 0 {
        (
            TRUE,
            reason::NO_TARGETS,
            "no Sandbox matches the selector and no Fly.io app is named".to_string(),
        )
    } else {
        let mut m = format!("{synced} of {total} targets hold content {hash}");
        if !parked.is_empty() {
            m.push_str(&format!(
                "; {} when they run: {}",
                parked.len(),
                list(&parked)
            ));
        }
        if !skipped.is_empty() {
            m.push_str(&format!("; skipped: {}", list(&skipped)));
        }
        if staged.is_empty() {
            (TRUE, reason::SYNCED, m)
        } else {
            m.push_str(&format!(
                "; staged, not deployed: {} (the apps' Machines take it at their next deploy or update)",
                list(&staged)
            ));
            (TRUE, reason::STAGED, m)
        }
    };
    conditions::set(
        &mut st.conditions,
        Desired {
            type_: cond::READY,
            status,
            reason: why,
            message,
        },
        generation,
        now,
    );
    let degraded = if !failed.is_empty() || !invalid_credentials.is_empty() {
        let mut all = failed.clone();
        all.extend(skipped.iter().cloned());
        let why = match (
            &failed_reason,
            invalid_credentials.is_empty(),
            skipped.is_empty(),
        ) {
            (Some(r), true, true) => r.as_str(),
            _ => reason::TARGETS_FAILED,
        };
        Some((why, format!("failing: {}", list(&all))))
    } else if !skipped.is_empty() {
        Some((
            skipped_reason.as_deref().unwrap_or(reason::TARGETS_SKIPPED),
            format!("skipped: {}", list(&skipped)),
        ))
    } else {
        None
    };
    match degraded {
        Some((why, message)) => {
            conditions::set(
                &mut st.conditions,
                Desired {
                    type_: cond::DEGRADED,
                    status: TRUE,
                    reason: why,
                    message,
                },
                generation,
                now,
            );
        }
        None => {
            conditions::remove(&mut st.conditions, cond::DEGRADED);
        }
    }
    st
}

/// The status when the sources cannot be rendered: Ready False naming the problem, the targets
/// left as they are (they keep the last content they took).
pub fn summarize_invalid(
    old: &SecretBundleStatus,
    generation: Option<i64>,
    problems: &[SourceProblem],
    now: Timestamp,
) -> SecretBundleStatus {
    let mut st = old.clone();
    st.observed_generation = generation;
    let why = problems
        .first()
        .map_or(reason::INVALID_SPEC, SourceProblem::reason);
    conditions::set(
        &mut st.conditions,
        Desired {
            type_: cond::READY,
            status: FALSE,
            reason: why,
            message: problems_message(problems),
        },
        generation,
        now,
    );
    st
}

/// At most `max` bytes of `s` (cut on a character boundary), marked when cut.
pub(super) fn excerpt(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &s[..cut])
}

pub(super) fn list(names: &[String]) -> String {
    let mut out = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        out.push_str(&format!(" and {} more", names.len() - 5));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    #[test]
    fn summary_conditions() {
        let c = content();
        let old = SecretBundleStatus::default();
        let e = |name: &str, state| Standing {
            entry: BundleTargetStatus {
                kind: BundleTargetKind::Sandbox,
                name: name.into(),
                synced_hash: None,
                synced_at: None,
                state,
                message: None,
                reason: None,
                fly: None,
            },
            blocks_ready: state != BundleTargetState::Skipped,
        };
        let st = summarize(
            &old,
            Some(2),
            &c,
            vec![
                e("a", BundleTargetState::Synced),
                e("b", BundleTargetState::Synced),
            ],
            &[],
            now(),
        );
        assert_eq!(
            (st.synced_targets, st.total_targets, st.key_count),
            (2, 2, 1)
        );
        assert_eq!(st.keys, ["A"]);
        assert_eq!(st.content_hash.as_ref(), Some(&c.hash));
        assert!(conditions::is_true(&st.conditions, cond::READY));
        assert!(conditions::get(&st.conditions, cond::DEGRADED).is_none());
        // Unchanged input: unchanged status (so no write).
        let again = summarize(
            &st,
            Some(2),
            &c,
            vec![
                e("a", BundleTargetState::Synced),
                e("b", BundleTargetState::Synced),
            ],
            &[],
            now() + Duration::from_secs(60),
        );
        assert_eq!(again, st);

        let st = summarize(
            &st,
            Some(2),
            &c,
            vec![
                e("a", BundleTargetState::Synced),
                e("b", BundleTargetState::Skipped),
            ],
            &[],
            now(),
        );
        assert!(conditions::is_true(&st.conditions, cond::READY));
        let d = conditions::get(&st.conditions, cond::DEGRADED).unwrap();
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            (TRUE, "TargetsSkipped")
        );

        let st = summarize(
            &st,
            Some(2),
            &c,
            vec![
                e("a", BundleTargetState::Failed),
                e("b", BundleTargetState::Synced),
            ],
            &[],
            now(),
        );
        let r = conditions::get(&st.conditions, cond::READY).unwrap();
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            (FALSE, reason::SYNC_FAILED)
        );
        assert!(r.message.contains("sandbox a"));

        let st = summarize(
            &st,
            Some(2),
            &c,
            vec![],
            &["Fly.io app x: bad token".into()],
            now(),
        );
        let r = conditions::get(&st.conditions, cond::READY).unwrap();
        assert_eq!(r.reason, reason::INVALID_SPEC);

        let st = summarize_invalid(
            &st,
            Some(3),
            &[SourceProblem::SecretMissing {
                secret: "db".into(),
            }],
            now(),
        );
        let r = conditions::get(&st.conditions, cond::READY).unwrap();
        assert_eq!(r.reason, "SourceSecretMissing");
        assert!(r.message.contains("db"));
        assert_eq!(st.observed_generation, Some(3));
    }
}
