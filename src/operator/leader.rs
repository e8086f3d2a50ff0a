//! Leader election with a `coordination.k8s.io/v1` Lease, the way client-go's leaderelection
//! package does it: one replica holds the Lease and acts; the others wait.
//!
//! - Acquire: create the Lease, or take it over when its holder has not renewed it for
//!   `lease_duration` as measured on *this* process's clock (from when the current record was
//!   first seen, so clock skew between replicas does not matter). Every write is a replace
//!   guarded by the `resourceVersion` that was read, so two candidates never both win.
//! - Renew: every `retry_period`. A leader that has not renewed for `renew_deadline` (shorter
//!   than `lease_duration`) gives up before anyone else may take over, and the process stops
//!   (`sandbox-operator run` exits non-zero; its Deployment restarts it as a candidate).
//! - Release: on a clean shutdown the Lease is handed back (holder cleared), so a standby takes
//!   over at once instead of after `lease_duration`.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::util::parse_duration;

/// The leader-election flags of `sandbox-operator run`.
#[derive(clap::Args, Debug, Clone)]
pub struct LeaderArgs {
    /// Hold a Lease before starting the controllers, so that only one replica acts.
    #[arg(long, env = "SANDBOX_OPERATOR_LEADER_ELECT")]
    pub leader_elect: bool,
    /// The Lease's name.
    #[arg(
        long,
        env = "SANDBOX_OPERATOR_LEASE_NAME",
        default_value = "sandbox-operator"
    )]
    pub lease_name: String,
    /// The Lease's namespace (default: $POD_NAMESPACE, else "default").
    #[arg(long, env = "SANDBOX_OPERATOR_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease (default: $POD_NAME, else host name and pid).
    #[arg(long, env = "SANDBOX_OPERATOR_LEASE_IDENTITY")]
    pub lease_identity: Option<String>,
    /// How long a Lease that is not renewed stays with its holder.
    #[arg(long, env = "SANDBOX_OPERATOR_LEASE_DURATION", default_value = "15s", value_parser = duration)]
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up (less than the duration).
    #[arg(long, env = "SANDBOX_OPERATOR_RENEW_DEADLINE", default_value = "10s", value_parser = duration)]
    pub renew_deadline: Duration,
    /// How often candidates try to acquire and the leader renews.
    #[arg(long, env = "SANDBOX_OPERATOR_RETRY_PERIOD", default_value = "2s", value_parser = duration)]
    pub retry_period: Duration,
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// Leader-election settings.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// The Lease's name.
    pub name: String,
    /// The Lease's namespace.
    pub namespace: String,
    /// This candidate's identity.
    pub identity: String,
    /// See [`LeaderArgs::lease_duration`].
    pub lease_duration: Duration,
    /// See [`LeaderArgs::renew_deadline`].
    pub renew_deadline: Duration,
    /// See [`LeaderArgs::retry_period`].
    pub retry_period: Duration,
}

impl LeaderArgs {
    /// The settings, checked, with defaults from the pod's environment.
    pub fn settings(&self) -> Result<LeaseSettings, Error> {
        if self.renew_deadline >= self.lease_duration {
            return Err(Error::Setting(
                "--renew-deadline must be shorter than --lease-duration".into(),
            ));
        }
        if self.retry_period >= self.renew_deadline {
            return Err(Error::Setting(
                "--retry-period must be shorter than --renew-deadline".into(),
            ));
        }
        if self.lease_duration < Duration::from_secs(1) {
            return Err(Error::Setting(
                "--lease-duration must be at least 1s".into(),
            ));
        }
        let namespace = self
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let identity = self
            .lease_identity
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(default_identity);
        Ok(LeaseSettings {
            name: self.lease_name.clone(),
            namespace,
            identity,
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
        })
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "sandbox-operator".into());
    format!("{host}_{}", std::process::id())
}

/// What can go wrong with leader election.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is wrong.
    #[error("leader election: {0}")]
    Setting(String),
}

/// What one attempt to acquire or renew found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// We hold the Lease (renewed just now).
    Held,
    /// Someone else holds it and it has not expired.
    HeldBy(String),
}

/// One candidate's view of the Lease.
struct Elector {
    api: Api<Lease>,
    s: LeaseSettings,
    /// The last record seen (holder, renew time, resourceVersion) and when this process first
    /// saw it: expiry is judged on the local clock from then.
    observed: Option<(String, Instant)>,
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

impl Elector {
    fn record_key(l: &Lease) -> String {
        let spec = l.spec.clone().unwrap_or_default();
        format!(
            "{}|{:?}",
            spec.holder_identity.unwrap_or_default(),
            spec.renew_time.map(|t| t.0)
        )
    }

    fn spec(&self, acquire_time: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.s.identity.clone()),
            lease_duration_seconds: Some(self.s.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(acquire_time.unwrap_or_else(now)),
            renew_time: Some(now()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One try: create, renew or take over the Lease.
    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let current = match self.api.get_opt(&self.s.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.s.name.clone()),
                        namespace: Some(self.s.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(None, 0)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(Attempt::Held),
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        Ok(Attempt::HeldBy("another candidate".into()))
                    }
                    Err(e) => Err(e),
                };
            }
            Some(l) => l,
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let key = Self::record_key(&current);
        let first_seen = match &self.observed {
            Some((k, t)) if *k == key => *t,
            _ => {
                let t = Instant::now();
                self.observed = Some((key, t));
                t
            }
        };
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(self.s.lease_duration);
        let ours = holder == self.s.identity;
        let expired = holder.is_empty() || first_seen.elapsed() >= duration;
        if !ours && !expired {
            return Ok(Attempt::HeldBy(holder));
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquire_time = if ours {
            spec.acquire_time.clone()
        } else {
            None
        };
        let mut next = current.clone();
        next.spec = Some(self.spec(acquire_time, transitions));
        // `next` carries the resourceVersion read above: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.s.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                self.observed = Some((Self::record_key(&written), Instant::now()));
                Ok(Attempt::Held)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::HeldBy(holder)),
            Err(e) => Err(e),
        }
    }

    /// Hands the Lease back if we hold it (holder cleared, so a standby takes it at once).
    async fn release(&mut self) {
        let Ok(Some(mut l)) = self.api.get_opt(&self.s.name).await else {
            return;
        };
        let Some(spec) = l.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(&self.s.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        match self
            .api
            .replace(&self.s.name, &PostParams::default(), &l)
            .await
        {
            Ok(_) => info!(lease = %self.s.name, "leader election: lease released"),
            Err(e) => {
                warn!(lease = %self.s.name, error = %e, "leader election: releasing the lease")
            }
        }
    }
}

/// Held leadership: renewed in the background until [`Leadership::release`] or until renewal
/// fails for the renew deadline, which [`Leadership::lost`] reports.
pub struct Leadership {
    lost: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Elector>,
}

impl Leadership {
    /// Resolves when leadership is lost (never, while it is held).
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|l| *l).await;
    }

    /// Stops renewing and hands the Lease back.
    pub async fn release(self) {
        let _ = self.stop.send(true);
        if let Ok(mut e) = self.task.await {
            e.release().await;
        }
    }
}

/// Waits until this candidate holds the Lease, then keeps renewing it in the background.
pub async fn acquire(client: kube::Client, s: LeaseSettings) -> Leadership {
    let api: Api<Lease> = Api::namespaced(client, &s.namespace);
    let mut e = Elector {
        api,
        s,
        observed: None,
    };
    info!(lease = %format!("{}/{}", e.s.namespace, e.s.name), identity = %e.s.identity, "leader election: waiting for the lease");
    let mut last_holder = String::new();
    loop {
        match e.try_acquire_or_renew().await {
            Ok(Attempt::Held) => break,
            Ok(Attempt::HeldBy(h)) => {
                if h != last_holder {
                    info!(holder = %h, "leader election: the lease is held by another replica");
                    last_holder = h;
                }
            }
            Err(err) => warn!(error = %err, "leader election: acquiring the lease"),
        }
        tokio::time::sleep(jitter(e.s.retry_period)).await;
    }
    info!(identity = %e.s.identity, "leader election: acquired the lease; this replica acts");
    let (lost_tx, lost_rx) = watch::channel(false);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut last_renew = Instant::now();
        loop {
            tokio::select! {
                _ = stop_rx.wait_for(|s| *s) => return e,
                _ = tokio::time::sleep(e.s.retry_period) => {}
            }
            // Each attempt may take at most what is left of the renew deadline.
            let left = e.s.renew_deadline.saturating_sub(last_renew.elapsed());
            let r = tokio::time::timeout(left, e.try_acquire_or_renew()).await;
            match r {
                Ok(Ok(Attempt::Held)) => last_renew = Instant::now(),
                Ok(Ok(Attempt::HeldBy(h))) => {
                    warn!(holder = %h, "leader election: the lease was taken over");
                    let _ = lost_tx.send(true);
                    return e;
                }
                Ok(Err(err)) => warn!(error = %err, "leader election: renewing the lease"),
                Err(_) => warn!("leader election: renewing the lease timed out"),
            }
            if last_renew.elapsed() >= e.s.renew_deadline {
                warn!(deadline = ?e.s.renew_deadline, "leader election: could not renew the lease in time");
                let _ = lost_tx.send(true);
                return e;
            }
        }
    });
    Leadership {
        lost: lost_rx,
        stop: stop_tx,
        task,
    }
}

/// `d` plus up to 20%, so that candidates do not retry in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d + d.mul_f64(f64::from(nanos % 1000) / 5000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(d: &str, r: &str, p: &str) -> LeaderArgs {
        LeaderArgs {
            leader_elect: true,
            lease_name: "x".into(),
            lease_namespace: Some("ns".into()),
            lease_identity: Some("me".into()),
            lease_duration: parse_duration(d).unwrap(),
            renew_deadline: parse_duration(r).unwrap(),
            retry_period: parse_duration(p).unwrap(),
        }
    }

    #[test]
    fn settings_need_retry_below_renew_below_duration() {
        assert!(args("15s", "10s", "2s").settings().is_ok());
        assert!(args("10s", "10s", "2s").settings().is_err());
        assert!(args("15s", "2s", "2s").settings().is_err());
        let s = args("15s", "10s", "2s").settings().unwrap();
        assert_eq!((s.namespace.as_str(), s.identity.as_str()), ("ns", "me"));
    }

    #[test]
    fn jitter_adds_at_most_a_fifth() {
        let d = Duration::from_secs(2);
        let j = jitter(d);
        assert!(j >= d && j <= d + d / 5);
    }
}
