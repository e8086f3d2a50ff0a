//! Pushing a SecretBundle's content: which Sandboxes it selects (from the shared store, with
//! the selector the validate step parsed), the push targets the plan asks for, and a round of
//! pushes to the sandboxes' agents (`PUT /env`) and the Fly.io apps, at most `maxParallel` at a
//! time, with progress written to status during a long round.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use tracing::{debug, info};

use super::decide::{
    self, Assessment, Claim, Content, Inputs, Memory, Outcome, Plan, SandboxObs, Standing,
    TargetKey,
};
use super::fly::{self, FlyTargets};
use super::scrub::Scrubber;
use super::sources::{self, SecretCache};
use super::{Context, Error, Stores, fly_api, record};
use crate::agent::client::{AgentClient, AgentError, AgentToken, Timeouts};
use crate::api::{ParsedSelector, Sandbox, SecretBundle, SecretBundleStatus, SecretKeyRef};

/// One push to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushTarget {
    /// A Sandbox's agent.
    Sandbox {
        /// The Sandbox.
        name: String,
        /// The agent URL.
        url: String,
        /// Where its token is.
        token: Option<SecretKeyRef>,
    },
    /// A Fly.io app, through flyctl.
    Fly {
        /// The app.
        app: String,
        /// `--stage`.
        stage: bool,
    },
    /// A Fly.io app, through the Machines API.
    FlyApi {
        /// The app.
        app: String,
        /// What the bundle knows of the app's secrets.
        known: fly::api::Known,
    },
}

impl PushTarget {
    /// The target's identity.
    pub fn key(&self) -> TargetKey {
        match self {
            PushTarget::Sandbox { name, .. } => TargetKey::Sandbox(name.clone()),
            PushTarget::Fly { app, .. } | PushTarget::FlyApi { app, .. } => {
                TargetKey::FlyApp(app.clone())
            }
        }
    }
}

/// The edge that carries out a push: the agent client or flyctl (a fake in tests).
pub trait Pusher {
    /// Pushes the content to one target.
    fn push(&self, target: &PushTarget) -> impl Future<Output = Outcome> + Send;
}

/// Pushes to `targets`, at most `max_parallel` at a time, yielding each outcome as it comes.
/// Once `stop` says so (the content changed meanwhile), no further push starts.
pub fn execute<'a, P: Pusher + Sync>(
    pusher: &'a P,
    targets: Vec<PushTarget>,
    max_parallel: usize,
    stop: impl Fn() -> bool + Send + 'a,
) -> impl Stream<Item = (TargetKey, Outcome)> + Send + 'a {
    futures::stream::iter(targets)
        .filter(move |_| futures::future::ready(!stop()))
        .map(move |t| async move {
            let outcome = pusher.push(&t).await;
            (t.key(), outcome)
        })
        .buffer_unordered(max_parallel.max(1))
}

/// The Sandboxes a bundle selects, as cached and as [`decide`] sees them.
pub(super) struct Selection {
    /// The selected Sandboxes, by name.
    pub selected: Vec<Arc<Sandbox>>,
    /// Each of them for [`decide`], with the bundle that owns its env file when another does.
    pub obs: Vec<SandboxObs>,
}

/// The Sandboxes of the bundle's namespace its parsed `selector` picks (none without one), each
/// with the bundle that owns its env file when several select it (the oldest; every bundle's
/// selector is read as the validate step reads it, an invalid one claiming nothing).
pub(super) fn select(
    stores: &Stores,
    obj: &SecretBundle,
    selector: Option<&ParsedSelector>,
) -> Selection {
    let ns = obj.namespace();
    let all_bundles = stores.bundles.state();
    let others: Vec<(&SecretBundle, Option<ParsedSelector>)> = all_bundles
        .iter()
        .filter(|b| b.namespace() == ns && b.metadata.deletion_timestamp.is_none())
        .map(|b| {
            let sel = b.spec.targets.sandboxes.as_ref();
            let parsed = sel.and_then(|t| t.selector.parse(decide::SELECTOR_FIELD).ok());
            (&**b, parsed)
        })
        .collect();
    let claims: Vec<Claim<'_>> = others
        .iter()
        .map(|(b, sel)| Claim {
            name: b.metadata.name.as_deref().unwrap_or_default(),
            created: b.metadata.creation_timestamp.as_ref().map(|t| t.0),
            selector: sel.as_ref(),
        })
        .collect();
    let mut selected: Vec<Arc<Sandbox>> = match selector {
        None => Vec::new(),
        Some(sel) => stores
            .sandboxes
            .state()
            .into_iter()
            .filter(|s| s.namespace() == ns && s.metadata.deletion_timestamp.is_none())
            .filter(|s| sel.selects(s))
            .collect(),
    };
    selected.sort_by_key(|s| s.name_any());
    let me = obj.name_any();
    let obs = selected
        .iter()
        .map(|s| {
            let labels = s.metadata.labels.clone().unwrap_or_default();
            let owner = decide::owner(&claims, &labels, s.spec.environment);
            sandbox_obs(s, owner.filter(|o| *o != me).map(str::to_string))
        })
        .collect();
    Selection { selected, obs }
}

/// A Sandbox as [`decide`] sees it.
fn sandbox_obs(s: &Sandbox, claimed_by: Option<String>) -> SandboxObs {
    let st = s.status.as_ref();
    let instance_state = st.and_then(|st| st.instance.as_ref()).and_then(|i| i.state);
    let agent = st.and_then(|st| st.agent.as_ref());
    let agent_url = agent
        .and_then(|a| a.url.clone())
        .or_else(|| s.spec.agent.url.clone());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    instance_state.hash(&mut h);
    agent_url.hash(&mut h);
    agent.map(|a| format!("{:?}", a.health)).hash(&mut h);
    s.spec.agent.token_secret_ref.hash(&mut h);
    SandboxObs {
        name: s.name_any(),
        instance_state,
        agent_url,
        reported_hash: agent.and_then(|a| a.env_sha256.clone()),
        reported_at: agent.and_then(|a| a.last_seen.as_ref()).map(|t| t.0),
        claimed_by,
        fingerprint: h.finish(),
    }
}

/// The agents' tokens read this round, by (Secret, key): the token, or what is wrong with it.
pub(super) type AgentTokens = HashMap<(String, String), Result<AgentToken, String>>;

/// What the plan picked to push, with what building the pushes needs.
pub(super) struct Picked<'a> {
    plan: &'a Plan,
    inputs: &'a Inputs<'a>,
    selection: &'a Selection,
    obj: &'a SecretBundle,
}

impl<'a> Picked<'a> {
    /// The plan's picks for this bundle.
    pub(super) fn new(
        plan: &'a Plan,
        inputs: &'a Inputs<'a>,
        selection: &'a Selection,
        obj: &'a SecretBundle,
    ) -> Self {
        Self {
            plan,
            inputs,
            selection,
            obj,
        }
    }

    /// The pushes, with the agents' tokens they need (read once each, and added to
    /// `scrubber`).
    pub(super) async fn targets(
        &self,
        secrets: &mut SecretCache<'_>,
        scrubber: &mut Scrubber,
    ) -> Result<(Vec<PushTarget>, AgentTokens), Error> {
        let (plan, inputs, selection, obj) = (self.plan, self.inputs, self.selection, self.obj);
        let mut tokens = AgentTokens::new();
        let mut targets = Vec::new();
        for a in plan.pushes() {
            match &a.key {
                TargetKey::Sandbox(name) => {
                    let Some(s) = selection.obs.iter().find(|s| &s.name == name) else {
                        continue;
                    };
                    let token_ref = selection
                        .selected
                        .iter()
                        .find(|x| &x.name_any() == name)
                        .and_then(|x| x.spec.agent.token_secret_ref.clone());
                    if let Some(r) = &token_ref {
                        let k = (r.name.clone(), r.key.clone());
                        if let std::collections::hash_map::Entry::Vacant(slot) = tokens.entry(k) {
                            let t = secrets.agent_token(r).await?;
                            if let Ok(t) = &t {
                                scrubber.add(t.expose());
                            }
                            slot.insert(t);
                        }
                    }
                    targets.push(PushTarget::Sandbox {
                        name: name.clone(),
                        url: s.agent_url.clone().unwrap_or_default(),
                        token: token_ref,
                    });
                }
                TargetKey::FlyApp(app)
                    if inputs.fly_apps.iter().any(|f| &f.app == app && f.api) =>
                {
                    targets.push(PushTarget::FlyApi {
                        app: app.clone(),
                        known: decide::fly_known(inputs, app),
                    });
                }
                TargetKey::FlyApp(app) => {
                    let spec = &obj.spec.targets.fly_apps;
                    let stage = spec.iter().find(|f| &f.app == app).is_some_and(|f| f.stage);
                    targets.push(PushTarget::Fly {
                        app: app.clone(),
                        stage,
                    });
                }
            }
        }
        Ok((targets, tokens))
    }
}

/// The real pusher: the agent client, Fly's Machines API and flyctl.
pub(super) struct Edge<'a> {
    /// The controller.
    ctx: &'a Context,
    /// The bundle, namespace/name.
    object: &'a str,
    /// What is pushed.
    content: &'a Content,
    /// The Fly.io apps: tokens and the import text.
    fly: &'a FlyTargets,
    /// The services an agent restarts after writing the env file.
    restart_services: &'a [String],
    /// Masks every value and token in what comes back.
    scrubber: &'a Scrubber,
    /// The agents' tokens.
    agent_tokens: &'a AgentTokens,
}

impl<'a> Edge<'a> {
    /// The pusher of a round of bundle `obj` (`object`, namespace/name). The tokens it will
    /// use are taught to the process-wide redactor now.
    pub(super) fn new(
        ctx: &'a Context,
        object: &'a str,
        obj: &'a SecretBundle,
        content: &'a Content,
        fly: &'a FlyTargets,
        scrubber: &'a Scrubber,
        agent_tokens: &'a AgentTokens,
    ) -> Self {
        let agent = agent_tokens.values().flatten().map(|t| t.expose());
        let fly_tokens = fly.tokens.values().map(String::as_str);
        sources::teach_tokens(&obj.uid().unwrap_or_default(), fly_tokens.chain(agent));
        let sandboxes = obj.spec.targets.sandboxes.as_ref();
        Self {
            ctx,
            object,
            content,
            fly,
            restart_services: sandboxes
                .map(|t| t.restart_services.as_slice())
                .unwrap_or_default(),
            scrubber,
            agent_tokens,
        }
    }
}

impl Pusher for Edge<'_> {
    async fn push(&self, target: &PushTarget) -> Outcome {
        match target {
            PushTarget::Sandbox { name, url, token } => {
                self.push_sandbox(name, url, token.as_ref()).await
            }
            PushTarget::Fly { app, stage } => {
                let (Some(token), Ok(stdin)) = (self.fly.tokens.get(app), &self.fly.import) else {
                    return Outcome::Failed {
                        message: "no usable token or import text (see the conditions)".into(),
                    };
                };
                let s = &self.ctx.settings;
                let hash = &self.content.hash;
                fly::import(
                    s,
                    self.object,
                    app,
                    *stage,
                    token,
                    stdin,
                    hash,
                    self.scrubber,
                )
                .await
            }
            PushTarget::FlyApi { app, known } => {
                let Some(token) = self.fly.tokens.get(app) else {
                    return Outcome::Failed {
                        message: "no usable token (see the conditions)".into(),
                    };
                };
                let (http, settings) = (&self.ctx.http, &self.ctx.settings.fly_api);
                fly_api::push(
                    http,
                    settings,
                    self.object,
                    app,
                    token,
                    known,
                    self.content,
                    self.scrubber,
                )
                .await
            }
        }
    }
}

impl Edge<'_> {
    /// `PUT /env` to one Sandbox's agent.
    async fn push_sandbox(&self, name: &str, url: &str, token: Option<&SecretKeyRef>) -> Outcome {
        let token = match token {
            None => None,
            Some(r) => match self.agent_tokens.get(&(r.name.clone(), r.key.clone())) {
                Some(Ok(t)) => Some(t.clone()),
                Some(Err(m)) => {
                    return Outcome::Failed { message: m.clone() };
                }
                None => {
                    return Outcome::Failed {
                        message: "the agent token was not read".into(),
                    };
                }
            },
        };
        let timeouts = Timeouts {
            put_env: self.ctx.settings.put_env_timeout,
            ..Timeouts::default()
        };
        let client = match AgentClient::with_http(self.ctx.http.clone(), url, token, timeouts) {
            Ok(c) => c.with_redactor(crate::redact::process().clone()),
            Err(e) => {
                return Outcome::Failed {
                    message: self.scrubber.scrub(&e.to_string()),
                };
            }
        };
        debug!(bundle = %self.object, sandbox = %name, agent = %url, "PUT /env");
        match client
            .put_env(&self.content.env, self.restart_services)
            .await
        {
            Ok(r) => Outcome::Synced { hash: r.sha256 },
            Err(AgentError::Unauthorized { url, .. }) => Outcome::Failed {
                message: format!(
                    "the agent at {url} refused the token (401): check spec.agent.tokenSecretRef of Sandbox {name}"
                ),
            },
            Err(e) => Outcome::Failed {
                message: self.scrubber.scrub(&e.to_string()),
            },
        }
    }
}

/// What a round of pushes came to.
pub(super) struct RoundResult {
    /// Each pushed target's outcome and when it came.
    pub outcomes: BTreeMap<TargetKey, (Outcome, Timestamp)>,
    /// The targets' retry state after the round.
    pub memory: BTreeMap<TargetKey, Memory>,
    /// The status as last written during the round (the old one when nothing was).
    pub status: SecretBundleStatus,
    /// A source changed during the round: no further push started.
    pub interrupted: bool,
}

/// Carries out a round: pushes `targets` through `edge`, at most `maxParallel` at a time,
/// stopping new pushes once a source changes (`epoch` moves); each outcome is remembered (retry
/// state), counted and recorded as it comes, and the status is written every
/// `progressInterval` while the round lasts.
pub(super) async fn round(
    ctx: &Arc<Context>,
    obj: &SecretBundle,
    edge: &Edge<'_>,
    targets: Vec<PushTarget>,
    plan: &Plan,
    inputs: &Inputs<'_>,
    epoch: u64,
) -> Result<RoundResult, Error> {
    let (object, uid) = (edge.object, obj.uid().unwrap_or_default());
    if !targets.is_empty() {
        info!(bundle = %object, content = %edge.content.short_hash(), targets = targets.len(), max_parallel = obj.spec.max_parallel, "pushing");
    }
    let fingerprints: HashMap<TargetKey, u64> = inputs
        .sandboxes
        .iter()
        .map(|s| (TargetKey::Sandbox(s.name.clone()), s.fingerprint))
        .chain(
            inputs
                .fly_apps
                .iter()
                .map(|f| (TargetKey::FlyApp(f.app.clone()), f.fingerprint)),
        )
        .collect();
    let mut r = RoundResult {
        outcomes: BTreeMap::new(),
        memory: inputs.memory.clone(),
        status: inputs.status.clone(),
        interrupted: false,
    };
    let mut last_write = Instant::now();
    let stop = {
        let (ctx, object) = (ctx.clone(), object.to_owned());
        move || ctx.epoch(&object) != epoch
    };
    let max_parallel = usize::try_from(obj.spec.max_parallel).unwrap_or(1).max(1);
    let mut stream = std::pin::pin!(execute(edge, targets, max_parallel, stop));
    while let Some((target, outcome)) = stream.next().await {
        let at = whole_seconds_now();
        let fp = fingerprints.get(&target).copied().unwrap_or_default();
        let m = r.memory.entry(target.clone()).or_default();
        decide::remember(m, &outcome, &Inputs { now: at, ..*inputs }, fp);
        let m = m.clone();
        ctx.memory
            .lock()
            .expect("memory")
            .entry(uid.clone())
            .or_default()
            .insert(target.clone(), m);
        record::outcome(ctx, obj, object, &target, &outcome).await;
        r.outcomes.insert(target, (outcome, at));
        if last_write.elapsed() >= ctx.settings.progress_interval {
            let st = summarize(&r.status, plan, &r.outcomes, inputs);
            if st != r.status {
                record::write_status(ctx, obj, &st).await?;
                r.status = st;
            }
            last_write = Instant::now();
        }
    }
    r.interrupted = ctx.epoch(object) != epoch;
    Ok(r)
}

/// The status after the outcomes so far, from `current`.
pub(super) fn summarize(
    current: &SecretBundleStatus,
    plan: &Plan,
    outcomes: &BTreeMap<TargetKey, (Outcome, Timestamp)>,
    inputs: &Inputs<'_>,
) -> SecretBundleStatus {
    let invalid_credentials: Vec<String> = plan
        .targets
        .iter()
        .filter_map(|a| a.invalid_credential.clone())
        .collect();
    decide::summarize(
        current,
        inputs.generation,
        inputs.content,
        standings(plan, outcomes, inputs),
        &invalid_credentials,
        inputs.now,
    )
}

/// The targets' standing: the outcome of a push where there was one, the plan's otherwise.
fn standings(
    plan: &Plan,
    outcomes: &BTreeMap<TargetKey, (Outcome, Timestamp)>,
    inputs: &Inputs<'_>,
) -> Vec<Standing> {
    plan.targets
        .iter()
        .map(|a: &Assessment| match outcomes.get(&a.key) {
            Some((o, at)) => Standing {
                entry: decide::entry_after(
                    a,
                    o,
                    &Inputs {
                        now: *at,
                        ..*inputs
                    },
                ),
                blocks_ready: decide::outcome_blocks_ready(o, inputs),
            },
            None => Standing {
                entry: a.entry.clone(),
                blocks_ready: a.blocks_ready,
            },
        })
        .collect()
}

/// Keeps the memory of the targets that still exist.
pub(super) fn prune(
    mut memory: BTreeMap<TargetKey, Memory>,
    plan: &Plan,
) -> BTreeMap<TargetKey, Memory> {
    memory.retain(|k, _| plan.targets.iter().any(|a| &a.key == k));
    memory
}

/// Now, in whole seconds (what a metav1.Time holds), so a status read back equals the one
/// written.
pub(super) fn whole_seconds_now() -> Timestamp {
    let now = Timestamp::now();
    Timestamp::from_second(now.as_second()).unwrap_or(now)
}

/// How long to wait before a retry of a reconcile that failed `n` times in a row.
pub(super) fn error_backoff(settings: &decide::Settings, n: u32) -> Duration {
    let base = settings.retry_base.max(Duration::from_secs(1));
    decide::backoff(
        &decide::Settings {
            retry_base: base,
            retry_max: settings.retry_max,
        },
        n,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    struct FakePusher {
        in_flight: AtomicUsize,
        max_seen: AtomicUsize,
        started: AtomicUsize,
    }

    impl Pusher for FakePusher {
        async fn push(&self, t: &PushTarget) -> Outcome {
            self.started.fetch_add(1, Ordering::SeqCst);
            let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_seen.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            match t {
                PushTarget::Fly { .. } | PushTarget::FlyApi { .. } => Outcome::Failed {
                    message: "x".into(),
                },
                PushTarget::Sandbox { .. } => Outcome::Synced { hash: "h".into() },
            }
        }
    }

    fn targets(n: usize) -> Vec<PushTarget> {
        (0..n)
            .map(|i| PushTarget::Sandbox {
                name: format!("s{i:02}"),
                url: "http://x".into(),
                token: None,
            })
            .chain([PushTarget::Fly {
                app: "app".into(),
                stage: false,
            }])
            .collect()
    }

    #[tokio::test]
    async fn at_most_max_parallel_pushes_run_at_once_and_all_finish() {
        let p = FakePusher {
            in_flight: AtomicUsize::new(0),
            max_seen: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
        };
        let out: Vec<(TargetKey, Outcome)> = execute(&p, targets(20), 5, || false).collect().await;
        assert_eq!(out.len(), 21);
        assert_eq!(p.max_seen.load(Ordering::SeqCst), 5);
        let keys: std::collections::BTreeSet<TargetKey> = out.iter().map(|o| o.0.clone()).collect();
        assert_eq!(keys.len(), 21);
        assert!(
            out.iter()
                .any(|(k, o)| *k == TargetKey::FlyApp("app".into())
                    && matches!(o, Outcome::Failed { .. }))
        );
    }

    #[tokio::test]
    async fn a_stop_starts_no_further_push() {
        let p = FakePusher {
            in_flight: AtomicUsize::new(0),
            max_seen: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
        };
        let stop = AtomicBool::new(false);
        let mut s = std::pin::pin!(execute(&p, targets(20), 3, || stop.load(Ordering::SeqCst)));
        let mut done = 0;
        while let Some(_o) = s.next().await {
            done += 1;
            if done == 4 {
                stop.store(true, Ordering::SeqCst);
            }
        }
        // The three in flight (plus at most one started as the fourth finished) complete; no
        // more start.
        let started = p.started.load(Ordering::SeqCst);
        assert!((4..=7).contains(&started), "{started}");
        assert_eq!(done, started);
    }
}
