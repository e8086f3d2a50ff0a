//! Sandboxes in bulk: namespaces, manifests, concurrent creation, and a watch that keeps what
//! each Sandbox's status said (and whether it ever showed a failure).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

use sandbox_operator::api::{Sandbox, SandboxPhase};

/// The label every bench Sandbox carries, naming its fleet.
pub const FLEET_LABEL: &str = "bench.fleet.valet.dev/fleet";
/// The Secret (and key) holding the agents' token.
pub const TOKEN_SECRET: &str = "agent-token";

/// Creates namespace `name` (fine if it exists).
pub async fn namespace(client: &Client, name: &str) -> Result<(), String> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(format!("creating namespace {name}: {e}")),
    }
}

/// Creates the agents' token Secret in `ns`.
pub async fn token_secret(client: &Client, ns: &str, token: &str) -> Result<(), String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": TOKEN_SECRET},
        "stringData": {"token": token},
    }))
    .expect("a Secret");
    match api.create(&PostParams::default(), &s).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(format!("creating the token Secret in {ns}: {e}")),
    }
}

/// How a bench Sandbox gets its instance.
#[derive(Debug, Clone)]
pub enum Source {
    /// `spec.launch` with this AMI (the operator launches it).
    Launch {
        /// The AMI.
        ami: String,
    },
    /// `spec.instanceId` (adoption), Full or ObserveOnly.
    Adopt {
        /// The instance.
        instance_id: String,
        /// `managementPolicy: ObserveOnly`.
        observe_only: bool,
    },
}

/// A bench Sandbox manifest.
pub fn manifest(
    name: &str,
    fleet: &str,
    source: &Source,
    agent_url: &str,
    probe_interval: Option<&str>,
) -> Sandbox {
    let mut agent = json!({
        "url": agent_url,
        "tokenSecretRef": {"name": TOKEN_SECRET, "key": "token"},
        "timeout": "2s",
    });
    if let Some(p) = probe_interval {
        agent["probeInterval"] = json!(p);
    }
    let mut spec = json!({
        "environment": "staging",
        "instanceType": "t3.large",
        "agent": agent,
    });
    match source {
        Source::Launch { ami } => spec["launch"] = json!({"imageId": ami}),
        Source::Adopt {
            instance_id,
            observe_only,
        } => {
            spec["instanceId"] = json!(instance_id);
            if *observe_only {
                spec["managementPolicy"] = json!("ObserveOnly");
            }
        }
    }
    serde_json::from_value(json!({
        "apiVersion": "fleet.valet.dev/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": name, "labels": {FLEET_LABEL: fleet}},
        "spec": spec,
    }))
    .expect("a Sandbox manifest")
}

/// Creates `objects` in `ns`, `parallel` at a time; returns how long it took.
pub async fn create_all(
    client: &Client,
    ns: &str,
    objects: Vec<Sandbox>,
    parallel: usize,
) -> Result<Duration, String> {
    let api: Api<Sandbox> = Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    futures::stream::iter(objects.into_iter().map(|o| {
        let api = api.clone();
        async move {
            let name = o.name_any();
            let mut tries = 0;
            loop {
                match api.create(&PostParams::default(), &o).await {
                    Ok(_) => return Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 409 => return Ok(()),
                    // The API server sheds load with 429/5xx: try again.
                    Err(e) if tries < 10 => {
                        tries += 1;
                        tracing::debug!(sandbox = %name, error = %e, "create failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                    }
                    Err(e) => return Err(format!("creating Sandbox {ns}/{name}: {e}")),
                }
            }
        }
    }))
    .buffer_unordered(parallel.max(1))
    .try_collect::<Vec<()>>()
    .await?;
    Ok(started.elapsed())
}

/// What the watch last saw of one Sandbox.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// Ready=True.
    pub ready: bool,
    /// When Ready=True was first seen.
    pub ready_at: Option<Instant>,
    /// Phase Failed or a failureReason was seen at some point.
    pub ever_failed: bool,
    /// The failure seen first, for the report.
    pub failure: Option<String>,
    /// The phase.
    pub phase: Option<SandboxPhase>,
    /// `status.instance.id`.
    pub instance_id: Option<String>,
    /// `status.instance.state`.
    pub instance_state: Option<String>,
    /// `status.agent.imageTag`.
    pub agent_tag: Option<String>,
    /// `status.deploy.tag` and `.state`.
    pub deploy: Option<(String, String)>,
    /// The ImageUpToDate condition's status.
    pub image_up_to_date: Option<String>,
    /// Status writes observed (modifications that changed `status`).
    pub status_changes: u64,
    /// When the status first carried a phase, a Ready condition and the object's
    /// generation as observedGeneration.
    pub status_at: Option<Instant>,
    /// The Ready condition's reason, as last seen.
    pub ready_reason: Option<String>,
}

/// A watch over the Sandboxes of one namespace.
pub struct FleetWatch {
    seen: Arc<Mutex<HashMap<String, Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FleetWatch {
    /// Starts watching `ns`.
    pub fn start(client: &Client, ns: &str) -> Self {
        let api: Api<Sandbox> = Api::namespaced(client.clone(), ns);
        let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = stream.next().await {
                let obj = match ev {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => o,
                    Ok(watcher::Event::Delete(o)) => {
                        s.lock().expect("seen").remove(&o.name_any());
                        continue;
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "bench watch error");
                        continue;
                    }
                };
                observe(&s, &obj);
            }
        });
        Self { seen, task }
    }

    /// Applies `f` to the map.
    pub fn with<T>(&self, f: impl FnOnce(&HashMap<String, Seen>) -> T) -> T {
        f(&self.seen.lock().expect("seen"))
    }

    /// Waits until `done` holds for the map, or `timeout` passes (then `Err` with how far it
    /// got, as `describe` words it).
    pub async fn wait(
        &self,
        timeout: Duration,
        done: impl Fn(&HashMap<String, Seen>) -> bool,
        describe: impl Fn(&HashMap<String, Seen>) -> String,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            if self.with(&done) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "not reached within {} s: {}",
                    timeout.as_secs(),
                    self.with(&describe)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many are Ready, and how many ever showed a failure.
    pub fn ready_and_failed(&self) -> (usize, usize, usize) {
        self.with(|m| {
            (
                m.len(),
                m.values().filter(|s| s.ready).count(),
                m.values().filter(|s| s.ever_failed).count(),
            )
        })
    }
}

impl Drop for FleetWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn observe(seen: &Mutex<HashMap<String, Seen>>, obj: &Sandbox) {
    let name = obj.name_any();
    let st = obj.status.clone().unwrap_or_default();
    let ready = st
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let failed = st.phase == Some(SandboxPhase::Failed) || st.failure_reason.is_some();
    let mut map = seen.lock().expect("seen");
    let e = map.entry(name).or_default();
    let new_instance_state = st
        .instance
        .as_ref()
        .and_then(|i| i.state.map(|s| s.as_str().to_string()));
    let changed = e.phase != st.phase
        || e.ready != ready
        || e.instance_state != new_instance_state
        || e.agent_tag != st.agent.as_ref().and_then(|a| a.image_tag.clone());
    if changed {
        e.status_changes += 1;
    }
    if ready && e.ready_at.is_none() {
        e.ready_at = Some(Instant::now());
    }
    let ready_cond = st.conditions.iter().find(|c| c.type_ == "Ready");
    if e.status_at.is_none()
        && st.phase.is_some()
        && ready_cond.is_some_and(|c| !c.reason.is_empty())
        && st.observed_generation.is_some()
        && st.observed_generation == obj.metadata.generation
    {
        e.status_at = Some(Instant::now());
    }
    e.ready_reason = ready_cond.map(|c| c.reason.clone());
    e.ready = ready;
    if failed && !e.ever_failed {
        e.ever_failed = true;
        e.failure = Some(format!(
            "{:?}: {} {}",
            st.phase,
            st.failure_reason.clone().unwrap_or_default(),
            st.failure_message.clone().unwrap_or_default()
        ));
    }
    e.phase = st.phase;
    e.instance_id = st.instance.as_ref().map(|i| i.id.clone());
    e.instance_state = new_instance_state;
    e.agent_tag = st.agent.as_ref().and_then(|a| a.image_tag.clone());
    e.deploy = st
        .deploy
        .as_ref()
        .map(|d| (d.tag.clone(), d.state.as_str().to_string()));
    e.image_up_to_date = st
        .conditions
        .iter()
        .find(|c| c.type_ == "ImageUpToDate")
        .map(|c| c.status.clone());
}
