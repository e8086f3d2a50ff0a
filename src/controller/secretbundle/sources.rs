//! Reading the Secrets a SecretBundle names, each at most once per reconcile: its sources
//! (what the content is rendered from), the Fly.io apps' tokens and the agents' tokens; and
//! teaching the process-wide redactor every value read, so no text an agent or a subprocess
//! returns can carry one into a log, an Event or the status.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::{Client, ResourceExt};
use tracing::{debug, info, warn};

use super::decide::SourceData;
use super::{CONTROLLER, Error};
use crate::agent::client::AgentToken;
use crate::api::{Sandbox, SecretBundle, SecretBundleSpec, SecretKeyRef};

/// One key of a Secret, as looked up.
pub(super) enum Lookup {
    /// The Secret does not exist.
    SecretMissing,
    /// The Secret has no such key.
    KeyMissing,
    /// The key's bytes.
    Found(Vec<u8>),
}

/// The Secrets of one namespace read in one reconcile, by name (a missing one as `None`).
pub(super) struct SecretCache<'a> {
    api: Api<Secret>,
    object: &'a str,
    cache: HashMap<String, Option<Secret>>,
}

impl<'a> SecretCache<'a> {
    /// An empty cache over `api`, for the bundle `object` (namespace/name).
    pub(super) fn new(api: Api<Secret>, object: &'a str) -> Self {
        Self {
            api,
            object,
            cache: HashMap::new(),
        }
    }

    async fn get(&mut self, name: &str) -> Result<Option<&Secret>, kube::Error> {
        if !self.cache.contains_key(name) {
            let s = self.api.get_opt(name).await?;
            self.cache.insert(name.to_string(), s);
        }
        Ok(self.cache.get(name).and_then(Option::as_ref))
    }

    async fn value(&mut self, r: &SecretKeyRef) -> Result<Lookup, kube::Error> {
        Ok(match self.get(&r.name).await? {
            None => Lookup::SecretMissing,
            Some(s) => match s.data.as_ref().and_then(|d| d.get(&r.key)) {
                Some(v) => Lookup::Found(v.0.clone()),
                None => Lookup::KeyMissing,
            },
        })
    }

    /// A Fly.io app's token Secret key.
    pub(super) async fn fly_token(&mut self, r: &SecretKeyRef) -> Result<Lookup, Error> {
        self.value(r)
            .await
            .map_err(|source| Error::ReadingFlyToken {
                object: self.object.to_owned(),
                secret: r.name.clone(),
                source,
            })
    }

    /// An agent's token from its Secret, or what is wrong with the reference.
    pub(super) async fn agent_token(
        &mut self,
        r: &SecretKeyRef,
    ) -> Result<Result<AgentToken, String>, Error> {
        let found = self
            .value(r)
            .await
            .map_err(|source| Error::ReadingAgentToken {
                object: self.object.to_owned(),
                secret: r.name.clone(),
                source,
            })?;
        Ok(match found {
            Lookup::Found(b) => Ok(AgentToken::new(String::from_utf8_lossy(&b).to_string())),
            Lookup::SecretMissing => Err(format!(
                "the agent token Secret {} does not exist (spec.agent.tokenSecretRef)",
                r.name
            )),
            Lookup::KeyMissing => Err(format!(
                "the agent token Secret {} has no key {} (spec.agent.tokenSecretRef)",
                r.name, r.key
            )),
        })
    }
}

/// Reads each source Secret once (a missing one as no data), and teaches the process-wide
/// redactor every key and value they hold, whether the bundle selects it or not.
pub(super) async fn read_sources(
    secrets: &mut SecretCache<'_>,
    spec: &SecretBundleSpec,
    uid: &str,
) -> Result<Vec<SourceData>, Error> {
    let mut data: Vec<SourceData> = Vec::new();
    for src in &spec.sources {
        if data.iter().any(|d| d.name == src.secret_name) {
            continue;
        }
        let object = secrets.object;
        let s = secrets
            .get(&src.secret_name)
            .await
            .map_err(|source| Error::ReadingSource {
                object: object.to_owned(),
                secret: src.secret_name.clone(),
                source,
            })?;
        data.push(SourceData {
            name: src.secret_name.clone(),
            data: s.map(|s| {
                s.data
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect()
            }),
        });
    }
    // Masked wherever an agent's or a subprocess's text enters, from now on (and from
    // start-up on, see [`seed_redactor`]).
    crate::redact::process().set(&redaction_source(uid), source_secrets(&data));
    Ok(data)
}

/// Teaches the process-wide redactor the tokens a bundle uses this round.
pub(super) fn teach_tokens<'t>(uid: &str, tokens: impl IntoIterator<Item = &'t str>) {
    crate::redact::process().set(
        &format!("{}/tokens", redaction_source(uid)),
        crate::redact::Secrets::values(tokens.into_iter().map(str::to_string)),
    );
}

/// Forgets, in the process-wide redactor, the values of bundles gone (by UID).
pub(super) fn forget(gone: &[String]) {
    if !gone.is_empty() {
        crate::redact::process()
            .retain(|src| redaction_uid(src).is_none_or(|u| !gone.iter().any(|g| g == u)));
    }
}

/// The process-wide redactor's source for a bundle's values (`<source>/tokens` for the tokens
/// it uses).
pub(super) fn redaction_source(uid: &str) -> String {
    format!("secretbundle/{uid}")
}

/// The bundle UID a redactor source belongs to.
fn redaction_uid(source: &str) -> Option<&str> {
    let rest = source.strip_prefix("secretbundle/")?;
    Some(rest.strip_suffix("/tokens").unwrap_or(rest))
}

/// Every key and value of the source Secrets, whether the bundle selects it or not.
fn source_secrets(data: &[SourceData]) -> crate::redact::Secrets {
    let mut s = crate::redact::Secrets::default();
    for d in data {
        for (k, v) in d.data.iter().flatten() {
            s.keys.push(k.clone());
            s.values.push(String::from_utf8_lossy(v).into_owned());
        }
    }
    s
}

/// Teaches the process-wide redactor ([`crate::redact::process`]) every secret the operator
/// may meet in an agent's or a subprocess's text before the controllers run, so that the first
/// reconciles after a restart mask what the previous process masked: the keys and values of
/// every SecretBundle's source Secrets, the Fly.io tokens they name, and every Sandbox's agent
/// token. Retries the lists for up to `patience`; a Secret that cannot be read is skipped (the
/// SecretBundle controller reads it again). Returns how many Secrets it read.
pub async fn seed_redactor(client: &Client, namespace: Option<&str>, patience: Duration) -> usize {
    let deadline = Instant::now() + patience;
    let mut delay = Duration::from_millis(200);
    loop {
        match seed_once(client, namespace).await {
            Ok(n) => {
                info!(
                    secrets = n,
                    sources = crate::redact::process().sources(),
                    "redaction seeded from SecretBundles and agent tokens"
                );
                return n;
            }
            Err(e) if Instant::now() + delay < deadline => {
                crate::controller::refused::error(CONTROLLER, "seeding the redaction", &e);
                debug!(error = %e, "seeding the redaction; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                warn!(error = %e, "could not seed the redaction from SecretBundles; the SecretBundle controller teaches it as it reconciles");
                return 0;
            }
        }
    }
}

async fn seed_once(client: &Client, namespace: Option<&str>) -> Result<usize, kube::Error> {
    let lp = kube::api::ListParams::default();
    let (bundles, sandboxes): (Api<SecretBundle>, Api<Sandbox>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let bundles = bundles.list(&lp).await?.items;
    let sandboxes = sandboxes.list(&lp).await?.items;
    // (namespace, Secret) -> Secret, read once each.
    let mut wanted: std::collections::BTreeSet<(String, String)> = Default::default();
    for b in &bundles {
        let ns = b.namespace().unwrap_or_default();
        for src in &b.spec.sources {
            wanted.insert((ns.clone(), src.secret_name.clone()));
        }
        for f in &b.spec.targets.fly_apps {
            wanted.insert((ns.clone(), f.token_secret_ref.name.clone()));
        }
    }
    for s in &sandboxes {
        if let Some(r) = &s.spec.agent.token_secret_ref {
            wanted.insert((s.namespace().unwrap_or_default(), r.name.clone()));
        }
    }
    let read: HashMap<(String, String), Secret> = futures::stream::iter(wanted)
        .map(|(ns, name)| {
            let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
            async move {
                match api.get_opt(&name).await {
                    Ok(Some(s)) => Some(((ns, name), s)),
                    Ok(None) => None,
                    Err(e) => {
                        debug!(secret = %format!("{ns}/{name}"), error = %e, "seeding the redaction: Secret not read");
                        None
                    }
                }
            }
        })
        .buffer_unordered(16)
        .filter_map(futures::future::ready)
        .collect()
        .await;
    let value = |ns: &str, r: &SecretKeyRef| {
        read.get(&(ns.to_string(), r.name.clone()))
            .and_then(|s| s.data.as_ref()?.get(&r.key))
            .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
    };
    let p = crate::redact::process();
    for b in &bundles {
        let (Some(uid), ns) = (b.uid(), b.namespace().unwrap_or_default()) else {
            continue;
        };
        let data: Vec<SourceData> = b
            .spec
            .sources
            .iter()
            .map(|src| SourceData {
                name: src.secret_name.clone(),
                data: read
                    .get(&(ns.clone(), src.secret_name.clone()))
                    .and_then(|s| s.data.as_ref())
                    .map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect()),
            })
            .collect();
        p.set(&redaction_source(&uid), source_secrets(&data));
        let tokens: Vec<String> = b
            .spec
            .targets
            .fly_apps
            .iter()
            .filter_map(|f| value(&ns, &f.token_secret_ref))
            .collect();
        p.set(
            &format!("{}/tokens", redaction_source(&uid)),
            crate::redact::Secrets::values(tokens),
        );
    }
    for s in &sandboxes {
        let ns = s.namespace().unwrap_or_default();
        if let Some(r) = &s.spec.agent.token_secret_ref
            && let Some(t) = value(&ns, r)
        {
            p.set_values(&format!("agent-token/{ns}/{}/{}", r.name, r.key), [t]);
        }
    }
    Ok(read.len())
}
