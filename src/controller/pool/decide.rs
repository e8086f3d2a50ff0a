//! What a SandboxPool should do now, from plain data and a clock: which members to create,
//! start, drain or delete, what its autoscaler recommends, whether a SandboxDeploy's tag
//! becomes the template's, and the status that says so. No I/O here.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;

use crate::api::conditions::{self, Desired, FALSE, TRUE};
use crate::api::pool_events as events;
use crate::api::{AfterDrainTimeout, SandboxPoolSpec, SandboxPoolStatus, SandboxSpec, Scaler};

/// Condition type: the pool has as many available members as it should.
pub const READY: &str = "Ready";
/// Condition type: the pool is changing its members.
pub const PROGRESSING: &str = "Progressing";

/// The spec, parsed once.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Members that should run.
    pub replicas: i32,
    /// Extra members kept launched but stopped.
    pub standby: i32,
    /// Zero active workers for this long makes a member idle.
    pub idle_window: Duration,
    /// How long a drained member may take to finish its workers.
    pub drain_timeout: Duration,
    /// Delete a member still busy after the drain timeout.
    pub force_after_drain: bool,
    /// Members beyond `replicas` while replacing.
    pub max_surge: i32,
    /// Members of `replicas` out of service at once while replacing.
    pub max_unavailable: i32,
    /// The hash of the template's launch settings.
    pub template_hash: String,
}

/// Why the spec cannot be acted on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid(pub String);

/// Parses the spec (durations) into settings.
pub fn settings(spec: &SandboxPoolSpec) -> Result<Settings, Invalid> {
    let dur = |field: &str, v: &str| {
        crate::util::parse_duration(v).map_err(|e| Invalid(format!("{field}: {e}")))
    };
    Ok(Settings {
        replicas: spec.replicas.max(0),
        standby: spec.standby.max(0),
        idle_window: dur("scaleDown.idleWindow", &spec.scale_down.idle_window)?,
        drain_timeout: dur("scaleDown.drainTimeout", &spec.scale_down.drain_timeout)?,
        force_after_drain: spec.scale_down.after_drain_timeout == AfterDrainTimeout::Force,
        max_surge: spec.max_surge.max(0),
        max_unavailable: spec.max_unavailable.max(0),
        template_hash: template_hash(&spec.template.spec),
    })
}

/// A short, stable hash of the template settings a running instance cannot take on: the
/// launch settings (AMI, subnet, security groups, ...), the instance type, the environment and
/// the browser engine. Members with another hash are replaced.
pub fn template_hash(spec: &SandboxSpec) -> String {
    use sha2::{Digest, Sha256};
    let relevant = serde_json::json!({
        "launch": spec.launch,
        "instanceType": spec.instance_type,
        "environment": spec.environment,
        "browserEngine": spec.browser_engine,
    });
    let digest = Sha256::digest(relevant.to_string().as_bytes());
    hex::encode(&digest[..5])
}

/// One member, as the edge observed it.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    /// Its name.
    pub name: String,
    /// Its template-hash label.
    pub hash: String,
    /// When it was created.
    pub created: Timestamp,
    /// It is being deleted already.
    pub deleting: bool,
    /// Its spec says powerState Stopped: a standby member.
    pub standby: bool,
    /// EC2 reports its instance stopped.
    pub instance_stopped: bool,
    /// Its Ready condition is True.
    pub ready: bool,
    /// Its agent's active workers, as last reported.
    pub active_workers: Option<i32>,
    /// Since when its agent has reported zero active workers (the edge remembers it).
    pub idle_since: Option<Timestamp>,
    /// AgentRegistered=False with reason RegistrationTimedOut.
    pub unregistered: bool,
    /// Phase Failed or Terminated: it will not serve again.
    pub broken: Option<String>,
    /// When the pool started removing it.
    pub retiring_since: Option<Timestamp>,
}

impl Member {
    fn busy(&self) -> bool {
        self.active_workers.unwrap_or(0) > 0
    }
}

/// What the edge is to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create a member from the template; standby members are created stopped.
    Create {
        /// powerState Stopped.
        standby: bool,
    },
    /// Start a standby member (powerState Running).
    Start {
        /// The member.
        name: String,
    },
    /// Mark a member as being removed and, when it is serving, drain it.
    Retire {
        /// The member.
        name: String,
        /// Ask its worker to drain (the Sandbox's day-2 `drain` action).
        drain: bool,
    },
    /// Delete a member (its instance goes with the Sandbox's deletion policy).
    Delete {
        /// The member.
        name: String,
        /// A CamelCase reason for the Event.
        reason: &'static str,
        /// Why.
        message: String,
    },
}

/// The outcome of one look at a pool.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// What to do.
    pub actions: Vec<Action>,
    /// The status to write.
    pub status: SandboxPoolStatus,
    /// When to look again without a change (something is under way).
    pub requeue: Option<Duration>,
}

/// The inputs of [`decide`].
pub struct Inputs<'a> {
    /// The parsed spec, or why it cannot be acted on.
    pub settings: Result<Settings, Invalid>,
    /// The status written last.
    pub status: &'a SandboxPoolStatus,
    /// The pool's generation.
    pub generation: Option<i64>,
    /// The members selector (`fleet.valet.dev/pool=<name>`).
    pub selector: String,
    /// The template's image tag.
    pub image_tag: Option<String>,
    /// Who sets replicas.
    pub scaler: Scaler,
    /// The members.
    pub members: &'a [Member],
    /// Now.
    pub now: Timestamp,
}

/// How often a pool with something under way is looked at.
pub const POLL: Duration = Duration::from_secs(2);

fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    let d = now.duration_since(since);
    if d.is_negative() {
        Duration::ZERO
    } else {
        d.unsigned_abs()
    }
}

/// Scale-in order: not ready, stopped, idle past the window, idle within it, busy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// Running but not Ready: serves nothing.
    NotReady,
    /// Its instance is stopped.
    Stopped,
    /// No active workers for the whole idle window.
    Idle,
    /// No active workers, for less than the window.
    IdleRecently,
    /// Active workers.
    Busy,
}

/// Where a member stands in the scale-in order.
pub fn class(m: &Member, s: &Settings, now: Timestamp) -> Class {
    if m.instance_stopped {
        Class::Stopped
    } else if !m.ready {
        Class::NotReady
    } else if m.busy() {
        Class::Busy
    } else if m
        .idle_since
        .is_some_and(|t| elapsed(t, now) >= s.idle_window)
    {
        Class::Idle
    } else {
        Class::IdleRecently
    }
}

/// The members to remove first, in order: by [`Class`], members of an older template before
/// current ones, then the newest first.
pub fn scale_in_order<'m>(members: &[&'m Member], s: &Settings, now: Timestamp) -> Vec<&'m Member> {
    let mut v: Vec<&Member> = members.to_vec();
    v.sort_by(|a, b| {
        let key = |m: &Member| (class(m, s, now), m.hash == s.template_hash);
        key(a)
            .cmp(&key(b))
            .then(b.created.cmp(&a.created))
            .then(a.name.cmp(&b.name))
    });
    v
}

/// Decides what to do with a pool's members.
pub fn decide(i: &Inputs<'_>) -> Decision {
    let now = i.now;
    let mut st = i.status.clone();
    st.observed_generation = i.generation;
    st.selector = Some(i.selector.clone());
    st.image_tag = i.image_tag.clone();
    st.scaler = Some(i.scaler);
    let mut cs = std::mem::take(&mut st.conditions);
    let s = match &i.settings {
        Ok(s) => s.clone(),
        Err(Invalid(msg)) => {
            set(&mut cs, READY, FALSE, "InvalidSpec", msg.clone(), i, now);
            set(
                &mut cs,
                PROGRESSING,
                FALSE,
                "InvalidSpec",
                msg.clone(),
                i,
                now,
            );
            st.conditions = cs;
            return Decision {
                actions: vec![],
                status: st,
                requeue: None,
            };
        }
    };
    let mut actions = Vec::new();
    let mut progress: Vec<(&'static str, String)> = Vec::new();
    let mut requeue: Option<Duration> = None;
    let mut soon = |d: Duration| {
        let d = d.max(Duration::from_millis(200));
        requeue = Some(requeue.map_or(d, |r: Duration| r.min(d)));
    };

    let live: Vec<&Member> = i.members.iter().filter(|m| !m.deleting).collect();
    let deleting = i.members.len() - live.len();

    // Members that will not serve again are replaced.
    let mut healthy: Vec<&Member> = Vec::new();
    for m in live {
        if m.unregistered {
            actions.push(Action::Delete {
                name: m.name.clone(),
                reason: events::MEMBER_UNREGISTERED,
                message: format!(
                    "member {} never registered its agent (AgentRegistered False, RegistrationTimedOut): replacing it",
                    m.name
                ),
            });
            progress.push(("ReplacingMembers", format!("replacing {}", m.name)));
        } else if let Some(why) = &m.broken {
            actions.push(Action::Delete {
                name: m.name.clone(),
                reason: events::MEMBER_FAILED,
                message: format!("member {} is {why}: replacing it", m.name),
            });
            progress.push(("ReplacingMembers", format!("replacing {}", m.name)));
        } else {
            healthy.push(m);
        }
    }

    // Members being removed: deleted once drained, or per the policy once the timeout passed.
    let (retiring, rest): (Vec<&Member>, Vec<&Member>) = healthy
        .into_iter()
        .partition(|m| m.retiring_since.is_some());
    for m in &retiring {
        let since = m.retiring_since.unwrap_or(now);
        let waited = elapsed(since, now);
        if m.instance_stopped || !m.busy() {
            actions.push(Action::Delete {
                name: m.name.clone(),
                reason: events::MEMBER_REMOVED,
                message: format!(
                    "member {} removed: {}",
                    m.name,
                    if m.instance_stopped {
                        "its instance is stopped"
                    } else {
                        "no active workers"
                    }
                ),
            });
        } else if waited >= s.drain_timeout && s.force_after_drain {
            actions.push(Action::Delete {
                name: m.name.clone(),
                reason: events::MEMBER_REMOVED_BUSY,
                message: format!(
                    "member {} still had {} active workers after the drain timeout ({}s): deleted per afterDrainTimeout Force",
                    m.name,
                    m.active_workers.unwrap_or(0),
                    s.drain_timeout.as_secs()
                ),
            });
        } else if waited >= s.drain_timeout {
            progress.push((
                "WaitingForDrain",
                format!(
                    "member {} still has {} active workers after the drain timeout: kept until they finish (afterDrainTimeout Wait)",
                    m.name,
                    m.active_workers.unwrap_or(0)
                ),
            ));
            soon(POLL);
        } else {
            progress.push((
                "Draining",
                format!(
                    "member {} is draining ({} active workers)",
                    m.name,
                    m.active_workers.unwrap_or(0)
                ),
            ));
            soon(POLL.min(s.drain_timeout - waited));
        }
    }

    let (standby, active): (Vec<&Member>, Vec<&Member>) = rest.into_iter().partition(|m| m.standby);
    let outdated_active = active.iter().filter(|m| m.hash != s.template_hash).count() as i32;
    let surge = if outdated_active > 0 {
        s.max_surge.min(outdated_active)
    } else {
        0
    };
    let target = s.replicas + surge;
    let n = active.len() as i32;
    let mut started = Vec::new();
    if n < target {
        // Scale out: standby members of the current template first (stopped ones first: they
        // are ready to start), new launches for the rest.
        let mut need = target - n;
        let mut candidates: Vec<&&Member> = standby
            .iter()
            .filter(|m| m.hash == s.template_hash)
            .collect();
        candidates.sort_by_key(|m| (!m.instance_stopped, m.created, m.name.clone()));
        for m in candidates {
            if need == 0 {
                break;
            }
            actions.push(Action::Start {
                name: m.name.clone(),
            });
            started.push(m.name.clone());
            need -= 1;
        }
        for _ in 0..need {
            actions.push(Action::Create { standby: false });
        }
        progress.push((
            "ScalingOut",
            format!(
                "{n} of {target} members: starting {} standby and launching {need}",
                started.len()
            ),
        ));
    } else if n > target {
        let excess = (n - target) as usize;
        for m in scale_in_order(&active, &s, now).into_iter().take(excess) {
            match class(m, &s, now) {
                Class::NotReady | Class::Stopped => actions.push(Action::Delete {
                    name: m.name.clone(),
                    reason: events::MEMBER_REMOVED,
                    message: format!("scale-in: member {} removed (not serving)", m.name),
                }),
                Class::Idle | Class::Busy => actions.push(Action::Retire {
                    name: m.name.clone(),
                    drain: true,
                }),
                Class::IdleRecently => {
                    let left = m
                        .idle_since
                        .map(|t| s.idle_window.saturating_sub(elapsed(t, now)))
                        .unwrap_or(s.idle_window);
                    progress.push((
                        "WaitingForIdle",
                        format!(
                            "scale-in: member {} has been idle for less than the idle window",
                            m.name
                        ),
                    ));
                    soon(left);
                }
            }
        }
        progress.push((
            "ScalingIn",
            format!("{n} of {target} members: removing {excess}"),
        ));
    } else if outdated_active > 0 {
        // Replace members of an older template, keeping replicas - maxUnavailable available.
        let min_available = s.replicas - s.max_unavailable;
        let mut available = active.iter().filter(|m| m.ready).count() as i32;
        let outdated: Vec<&Member> = active
            .iter()
            .copied()
            .filter(|m| m.hash != s.template_hash)
            .collect();
        for m in scale_in_order(&outdated, &s, now) {
            if !m.ready || m.instance_stopped {
                actions.push(Action::Delete {
                    name: m.name.clone(),
                    reason: events::MEMBER_REPLACED,
                    message: format!(
                        "member {} runs an older template and is not serving: replaced",
                        m.name
                    ),
                });
            } else if available > min_available {
                available -= 1;
                actions.push(Action::Retire {
                    name: m.name.clone(),
                    drain: true,
                });
            }
        }
        progress.push((
            "Replacing",
            format!("{outdated_active} members run an older template: replacing them"),
        ));
    }

    // Standby: of the current template, as many as asked.
    let mut kept_standby = 0;
    let mut extra: Vec<&Member> = Vec::new();
    for m in &standby {
        if started.contains(&m.name) {
            continue;
        }
        if m.hash != s.template_hash {
            actions.push(Action::Delete {
                name: m.name.clone(),
                reason: events::MEMBER_REPLACED,
                message: format!("standby member {} runs an older template: replaced", m.name),
            });
        } else {
            kept_standby += 1;
            extra.push(m);
        }
    }
    if kept_standby < s.standby {
        for _ in kept_standby..s.standby {
            actions.push(Action::Create { standby: true });
        }
        progress.push((
            "FillingStandby",
            format!("{kept_standby} of {} standby members", s.standby),
        ));
    } else if kept_standby > s.standby {
        // Not-yet-stopped and newest first.
        extra.sort_by(|a, b| {
            a.instance_stopped
                .cmp(&b.instance_stopped)
                .then(b.created.cmp(&a.created))
        });
        for m in extra.into_iter().take((kept_standby - s.standby) as usize) {
            actions.push(Action::Delete {
                name: m.name.clone(),
                reason: events::MEMBER_REMOVED,
                message: format!("standby member {} is beyond spec.standby", m.name),
            });
        }
    }
    let standby_not_stopped = standby
        .iter()
        .filter(|m| !started.contains(&m.name) && m.hash == s.template_hash)
        .any(|m| !m.instance_stopped);
    if standby_not_stopped {
        progress.push(("FillingStandby", "standby members are launching".into()));
    }

    // Status: what is, before this decision's actions take effect.
    let serving: Vec<&&Member> = active
        .iter()
        .filter(|m| m.ready && !m.instance_stopped)
        .collect();
    st.replicas = n;
    st.available = serving.len() as i32;
    st.ready = st.available + retiring.iter().filter(|m| m.ready).count() as i32;
    st.busy = serving.iter().filter(|m| m.busy()).count() as i32;
    st.idle = st.available - st.busy;
    st.standby = standby
        .iter()
        .filter(|m| m.instance_stopped && m.hash == s.template_hash)
        .count() as i32;
    st.updated = active.iter().filter(|m| m.hash == s.template_hash).count() as i32;
    st.retiring = retiring.len() as i32;

    if st.available >= s.replicas {
        set(
            &mut cs,
            READY,
            TRUE,
            "MembersReady",
            format!("{} of {} members ready", st.available, s.replicas),
            i,
            now,
        );
    } else {
        set(
            &mut cs,
            READY,
            FALSE,
            "MembersNotReady",
            format!("{} of {} members ready", st.available, s.replicas),
            i,
            now,
        );
    }
    if !actions.is_empty() || deleting > 0 || !retiring.is_empty() {
        soon(POLL);
    }
    if deleting > 0 && progress.is_empty() {
        progress.push((
            "RemovingMembers",
            format!("{deleting} members are being deleted"),
        ));
    }
    match progress.first() {
        Some((reason, _)) => {
            let message = progress
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            set(&mut cs, PROGRESSING, TRUE, reason, message, i, now);
        }
        None => set(
            &mut cs,
            PROGRESSING,
            FALSE,
            "Stable",
            format!(
                "{} members and {} standby, as the spec asks",
                s.replicas, s.standby
            ),
            i,
            now,
        ),
    }
    st.conditions = cs;
    Decision {
        actions,
        status: st,
        requeue,
    }
}

fn set(
    cs: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    i: &Inputs<'_>,
    now: Timestamp,
) {
    conditions::set(
        cs,
        Desired {
            type_,
            status,
            reason,
            message,
        },
        i.generation,
        now,
    );
}

/// The autoscaler's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoscaleSettings {
    /// The fewest members.
    pub min: i32,
    /// The most members.
    pub max: i32,
    /// The share of capacity that should be busy.
    pub target: f64,
    /// A lower size waits this long.
    pub window: Duration,
    /// Browser sessions per member (the template's capacity).
    pub capacity: i32,
}

/// The autoscaler's settings from the spec: `None` when `spec.autoscale` is unset (someone
/// else drives the scale subresource).
pub fn autoscale_settings(spec: &SandboxPoolSpec) -> Result<Option<AutoscaleSettings>, Invalid> {
    let Some(a) = &spec.autoscale else {
        return Ok(None);
    };
    let window = crate::util::parse_duration(&a.stabilization_window)
        .map_err(|e| Invalid(format!("autoscale.stabilizationWindow: {e}")))?;
    Ok(Some(AutoscaleSettings {
        min: a.min_replicas,
        max: a.max_replicas,
        target: a.target_busy_fraction,
        window,
        capacity: spec.template.spec.capacity,
    }))
}

/// What the autoscaler decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Autoscaled {
    /// The replicas to set.
    pub replicas: i32,
    /// The recommendation now.
    pub recommended: i32,
    /// Since when recommendations have been lower than the replicas.
    pub lower_since: Option<Timestamp>,
}

/// The size the pool should have for `active_workers` busy sessions (the ready members'
/// agents' sum), applied at once upwards and only after a whole window of lower
/// recommendations downwards.
pub fn autoscale(
    a: &AutoscaleSettings,
    replicas: i32,
    active_workers: i32,
    lower_since: Option<Timestamp>,
    now: Timestamp,
) -> Autoscaled {
    let per_member = f64::from(a.capacity.max(1)) * a.target.clamp(0.01, 1.0);
    let raw = (f64::from(active_workers.max(0)) / per_member).ceil() as i32;
    let recommended = raw.clamp(a.min, a.max.max(a.min));
    if recommended > replicas || replicas > a.max || replicas < a.min {
        let replicas = if recommended > replicas {
            recommended
        } else {
            replicas.clamp(a.min, a.max)
        };
        return Autoscaled {
            replicas,
            recommended,
            lower_since: None,
        };
    }
    if recommended == replicas {
        return Autoscaled {
            replicas,
            recommended,
            lower_since: None,
        };
    }
    let since = lower_since.unwrap_or(now);
    if elapsed(since, now) >= a.window {
        Autoscaled {
            replicas: recommended,
            recommended,
            lower_since: None,
        }
    } else {
        Autoscaled {
            replicas,
            recommended,
            lower_since: Some(since),
        }
    }
}

/// A SandboxDeploy as the pool sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeployObs {
    /// Its name.
    pub name: String,
    /// Its tag.
    pub tag: String,
    /// It Succeeded.
    pub succeeded: bool,
    /// When it finished.
    pub finished_at: Option<Timestamp>,
    /// Its selector picks the pool's members (template labels, pool label, environment).
    pub selects_members: bool,
}

/// The tag the template should take: the newest Succeeded deploy that selects the members,
/// when it is not the one already taken. A failed, aborted or rolled-back deploy never moves
/// the template.
pub fn template_tag<'d>(deploys: &'d [DeployObs], taken: Option<&str>) -> Option<&'d DeployObs> {
    let newest = deploys
        .iter()
        .filter(|d| d.succeeded && d.selects_members)
        .max_by(|a, b| a.finished_at.cmp(&b.finished_at).then(a.name.cmp(&b.name)))?;
    if taken == Some(newest.name.as_str()) {
        return None;
    }
    Some(newest)
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
