//! Requests the API server refuses for want of permission (HTTP 403): an operator deployed with
//! too narrow a Role says which call was refused and for whom, in its log and as a Warning Event
//! on its own Pod, and keeps running: the watch or reconcile is retried on its usual schedule and
//! works as soon as the permission is granted.
//!
//! The API server's 403 message names everything: `secretbundles.fleet.valet.dev is forbidden:
//! User "system:serviceaccount:ops:sandbox-operator" cannot list resource "secretbundles" in API
//! group "fleet.valet.dev" in the namespace "fleet"`. [`parse`] takes it apart (a pure function);
//! the edge reports each distinct refusal once, then again at most every [`REPEAT`] while it
//! lasts, so that a watch retried every second does not flood the log or the Events.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use tracing::{error, warn};

/// How often a refusal that lasts is reported again.
pub const REPEAT: Duration = Duration::from_secs(300);

/// A refused request, from the API server's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Who asked: `system:serviceaccount:NAMESPACE:NAME` for a ServiceAccount.
    pub user: String,
    /// The verb: get, list, watch, create, patch, update, delete.
    pub verb: String,
    /// The resource, with its subresource (`sandboxes/status`) when there is one.
    pub resource: String,
    /// The API group ("" for the core group).
    pub group: String,
    /// The namespace, or None at the cluster scope (a list across all namespaces).
    pub namespace: Option<String>,
}

impl Refusal {
    /// The `kubectl auth can-i` line that shows the refusal, for the log and the Event.
    pub fn can_i(&self) -> String {
        let resource = match (self.group.as_str(), self.resource.split_once('/')) {
            ("", Some((r, s))) => format!("{r} --subresource={s}"),
            ("", None) => self.resource.clone(),
            (g, Some((r, s))) => format!("{r}.{g} --subresource={s}"),
            (g, None) => format!("{}.{g}", self.resource),
        };
        let scope = match &self.namespace {
            Some(ns) => format!("-n {ns}"),
            None => "--all-namespaces".into(),
        };
        format!(
            "kubectl auth can-i {} {resource} {scope} --as={}",
            self.verb, self.user
        )
    }
}

fn quoted_after<'a>(message: &'a str, marker: &str) -> Option<&'a str> {
    let rest = &message[message.find(marker)? + marker.len()..];
    rest.split('"').next()
}

/// Takes a 403 message of the API server's RBAC authorizer apart; None for any other text.
pub fn parse(message: &str) -> Option<Refusal> {
    let user = quoted_after(message, "User \"")?.to_string();
    let verb = {
        let rest = &message[message.find("\" cannot ")? + "\" cannot ".len()..];
        rest.split(' ').next()?.to_string()
    };
    let resource = quoted_after(message, "resource \"")?.to_string();
    let group = quoted_after(message, "in API group \"")
        .unwrap_or("")
        .to_string();
    let subresource = quoted_after(message, "subresource \"");
    let resource = match subresource {
        Some(s) if !s.is_empty() => format!("{resource}/{s}"),
        _ => resource,
    };
    let namespace = quoted_after(message, "in the namespace \"").map(str::to_string);
    Some(Refusal {
        user,
        verb,
        resource,
        group,
        namespace,
    })
}

/// The 403 message in a kube error, if it is one.
pub fn forbidden(err: &kube::Error) -> Option<&str> {
    match err {
        kube::Error::Api(s) if s.code == 403 => Some(s.message.as_str()),
        _ => None,
    }
}

/// The 403 message in a watch error, if it is one.
pub fn forbidden_watch(err: &watcher::Error) -> Option<&str> {
    match err {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => forbidden(e),
        watcher::Error::WatchError(s) if s.code == 403 => Some(s.message.as_str()),
        _ => None,
    }
}

/// The 403 message anywhere in an error's chain of sources.
pub fn forbidden_in(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(k) = e.downcast_ref::<kube::Error>()
            && let Some(m) = forbidden(k)
        {
            return Some(m.to_string());
        }
        if let Some(w) = e.downcast_ref::<watcher::Error>()
            && let Some(m) = forbidden_watch(w)
        {
            return Some(m.to_string());
        }
        cur = e.source();
    }
    None
}

struct Edge {
    /// The Recorder and the operator's own Pod, when it runs in one (POD_NAME, POD_NAMESPACE).
    events: Option<(Recorder, ObjectReference)>,
    /// When each refusal (by message) was last reported.
    last: Mutex<HashMap<String, Instant>>,
}

static EDGE: OnceLock<Edge> = OnceLock::new();

/// Lets refusals be published as Events on the operator's Pod (named by the POD_NAME and
/// POD_NAMESPACE environment variables the chart sets); without them, the log only.
pub fn init(client: &Client) {
    let pod = std::env::var("POD_NAME").ok().filter(|s| !s.is_empty());
    let ns = std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|s| !s.is_empty());
    let events = match (pod, ns) {
        (Some(name), Some(namespace)) => Some((
            Recorder::new(
                client.clone(),
                Reporter {
                    controller: "sandbox-operator".into(),
                    instance: Some(name.clone()),
                },
            ),
            ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name),
                namespace: Some(namespace),
                ..Default::default()
            },
        )),
        _ => None,
    };
    let _ = EDGE.set(Edge {
        events,
        last: Mutex::default(),
    });
}

/// Reports a watch error of `controller` if it is a refusal (a 403); other errors are the
/// watch's own business (it retries).
pub fn watch_error(controller: &'static str, err: &watcher::Error) {
    if let Some(m) = forbidden_watch(err) {
        report(controller, "watching", m);
    }
}

/// `stream` (a watcher's), reporting its refusals as [`watch_error`] does.
pub fn reported<S, K>(
    controller: &'static str,
    stream: S,
) -> impl futures::Stream<Item = Result<K, watcher::Error>>
where
    S: futures::Stream<Item = Result<K, watcher::Error>>,
{
    use futures::StreamExt;
    stream.inspect(move |r| {
        if let Err(e) = r {
            watch_error(controller, e);
        }
    })
}

/// Reports an error of `controller` (`doing` what) if a refusal is in its chain of sources.
pub fn error(
    controller: &'static str,
    doing: &'static str,
    err: &(dyn std::error::Error + 'static),
) {
    if let Some(m) = forbidden_in(err) {
        report(controller, doing, &m);
    }
}

/// Logs the refusal and publishes it as an Event (once per [`REPEAT`] per distinct message).
pub fn report(controller: &'static str, doing: &'static str, message: &str) {
    let now = Instant::now();
    if let Some(edge) = EDGE.get() {
        let mut last = edge.last.lock().expect("refusals");
        if last
            .get(message)
            .is_some_and(|t| now.duration_since(*t) < REPEAT)
        {
            return;
        }
        last.insert(message.to_string(), now);
    }
    let parsed = parse(message);
    let (user, verb, resource, namespace, check) = match &parsed {
        Some(r) => (
            r.user.as_str(),
            r.verb.as_str(),
            if r.group.is_empty() {
                r.resource.clone()
            } else {
                format!("{}.{}", r.resource, r.group)
            },
            r.namespace.as_deref().unwrap_or("(all namespaces)"),
            r.can_i(),
        ),
        None => ("?", "?", "?".into(), "?", String::new()),
    };
    error!(
        controller,
        user,
        verb,
        resource = %resource,
        namespace,
        check = %check,
        "the API server refused a request while {doing}: {message}; the operator keeps running and retries; grant the permission in its Role or ClusterRole (charts/sandbox-operator/templates/rbac.yaml)"
    );
    let Some((recorder, pod)) = EDGE.get().and_then(|e| e.events.clone()) else {
        return;
    };
    let note = format!(
        "{controller} controller, {doing}: {message} (check: {check}). The operator keeps running and retries."
    );
    tokio::spawn(async move {
        let ev = Event {
            type_: EventType::Warning,
            reason: "Forbidden".into(),
            // The Events API limits the note to 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: "Authorize".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &pod).await {
            warn!(error = %e, "could not record the refused request as an Event on the operator's Pod");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_an_rbac_refusal_apart() {
        let r = parse(r#"secretbundles.fleet.valet.dev is forbidden: User "system:serviceaccount:ops:op" cannot list resource "secretbundles" in API group "fleet.valet.dev" in the namespace "fleet""#).unwrap();
        assert_eq!(
            r,
            Refusal {
                user: "system:serviceaccount:ops:op".into(),
                verb: "list".into(),
                resource: "secretbundles".into(),
                group: "fleet.valet.dev".into(),
                namespace: Some("fleet".into()),
            }
        );
        assert_eq!(
            r.can_i(),
            "kubectl auth can-i list secretbundles.fleet.valet.dev -n fleet --as=system:serviceaccount:ops:op"
        );
        let r = parse(r#"secrets is forbidden: User "system:serviceaccount:ops:op" cannot watch resource "secrets" in API group "" at the cluster scope"#).unwrap();
        assert_eq!(r.group, "");
        assert_eq!(r.namespace, None);
        assert_eq!(
            r.can_i(),
            "kubectl auth can-i watch secrets --all-namespaces --as=system:serviceaccount:ops:op"
        );
        let r = parse(r#"sandboxes.fleet.valet.dev "w" is forbidden: User "alice" cannot patch resource "sandboxes/status" in API group "fleet.valet.dev" in the namespace "n""#).unwrap();
        assert_eq!(r.resource, "sandboxes/status");
        assert!(
            r.can_i()
                .contains("sandboxes.fleet.valet.dev --subresource=status")
        );
        assert_eq!(parse("connection refused"), None);
    }

    #[test]
    fn finds_a_403_in_a_chain_of_errors() {
        #[derive(Debug, thiserror::Error)]
        #[error("writing status: {source}")]
        struct Outer {
            source: kube::Error,
        }
        let status = kube::core::Status {
            code: 403,
            message: "denied".into(),
            ..Default::default()
        };
        let e = Outer {
            source: kube::Error::Api(Box::new(status.clone())),
        };
        assert_eq!(forbidden_in(&e).as_deref(), Some("denied"));
        let w = watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status)));
        assert_eq!(forbidden_watch(&w), Some("denied"));
        let other = kube::core::Status {
            code: 404,
            message: "gone".into(),
            ..Default::default()
        };
        assert_eq!(
            forbidden_in(&Outer {
                source: kube::Error::Api(Box::new(other))
            }),
            None
        );
    }
}
