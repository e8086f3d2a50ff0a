//! The EC2 layer: one shared, batched, rate-limited view of the fleet's instances, and the
//! calls that change them (DESIGN.md sections 4 and 6).
//!
//! - **Reads** go through one shared view. [`Ec2::describe`] answers from the view when its
//!   observation is recent enough, else joins the current batch: every describe that arrives
//!   within [`Ec2Settings::batch_window`] shares one `DescribeInstances` (Karpenter's batcher).
//!   Described ids are *tracked*, and a periodic refresh re-describes all of them with as few
//!   calls as the API allows (through the managed-by tag, by id, or a paginated listing of the
//!   whole region when that takes fewer pages); [`Ec2::changes`] yields the ids whose
//!   observation changed.
//! - **Writes**: start, stop and terminate of many instances merge into one call per batch;
//!   when a merged call fails because of some of its instances, they are told apart and the
//!   others go through anyway. Launches are idempotent by ClientToken.
//! - **Pacing**: a client-side token bucket per category ([`RateLimits`]) keeps the account's
//!   buckets from draining. A call the bucket would hold too long is not sent and surfaces as
//!   [`Ec2Error::Paced`]; a launch can take its turn in line without waiting
//!   ([`Ec2::launch_turn`]). That is the operator's own pacing, logged and counted
//!   (`ec2_client_paced`) apart from AWS's throttling: `RequestLimitExceeded` answers and
//!   server trouble are retried here with exponential backoff and jitter (the SDK's own
//!   retries are switched off, so the call counters see every attempt), then surface as
//!   [`Ec2Error::Throttled`] / [`Ec2Error::Unavailable`]. The controller requeues all of
//!   them: never a failure of the object.
//! - **Eventual consistency**: EC2 may not show an instance for a while after RunInstances
//!   (DescribeInstances by id answers `InvalidInstanceID.NotFound` for the whole call, filtered
//!   answers omit it). An instance this layer launched is reported as RunInstances described
//!   it until EC2 shows it, for [`LAUNCH_GRACE`]; a batch where such an id fails the whole call
//!   is split so the other ids are answered. Tags go with RunInstances (TagSpecifications),
//!   never by a later CreateTags that EC2 could refuse for the new id.
//!
//! The pure parts live in submodules with their unit tests: [`error`] (classification of AWS
//! answers, instance ids in messages), [`limiter`] (token bucket arithmetic, backoff),
//! [`batch`] (batching and chunking), `cache` (the view's bookkeeping) and `convert`; `engine` holds the calls, retries and batch handlers.

pub mod batch;
mod cache;
mod convert;
mod engine;
pub mod error;
pub mod limiter;
mod metrics;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use tokio::sync::{broadcast, mpsc};

pub use cache::LAUNCH_GRACE;
pub use error::Ec2Error;
pub use limiter::RateLimit;

use self::batch::Batcher;
use self::engine::{Core, Power};

/// Tag on every instance the operator launches; value [`MANAGED_BY_VALUE`].
pub const TAG_MANAGED_BY: &str = "fleet.valet.dev/managed-by";
/// The value of [`TAG_MANAGED_BY`].
pub const MANAGED_BY_VALUE: &str = "sandbox-operator";
/// Tag: the Sandbox's UID (the pre-launch lookup and the orphan sweep use it).
pub const TAG_UID: &str = "fleet.valet.dev/sandbox-uid";
/// Tag: the Sandbox's namespace.
pub const TAG_NAMESPACE: &str = "fleet.valet.dev/namespace";
/// Tag: the Sandbox's name.
pub const TAG_NAME: &str = "fleet.valet.dev/name";
/// Tag: the Sandbox's environment (dev, staging, prod).
pub const TAG_ENVIRONMENT: &str = "fleet.valet.dev/environment";

/// AWS accepts at most this many values in one filter.
pub const MAX_FILTER_VALUES: usize = 200;
/// Most results per DescribeInstances page (AWS's maximum).
pub const MAX_RESULTS: i32 = 1000;
/// Most instance ids in one call (DescribeInstances `InstanceIds`, Start/Stop/Terminate).
pub const MAX_IDS_PER_CALL: usize = 1000;

/// An instance as EC2 reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    /// `i-...`.
    pub id: String,
    /// The lifecycle state.
    pub state: InstanceState,
    /// `t3.large`, ...
    pub instance_type: Option<String>,
    /// Private IPv4 address.
    pub private_ip: Option<String>,
    /// Public IPv4 address (none while stopped).
    pub public_ip: Option<String>,
    /// Private DNS name.
    pub private_dns: Option<String>,
    /// Public DNS name.
    pub public_dns: Option<String>,
    /// `us-east-1a`, ...
    pub availability_zone: Option<String>,
    /// When the instance was last launched or started.
    pub launch_time: Option<jiff::Timestamp>,
    /// A spot instance.
    pub spot: bool,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
}

/// An instance's lifecycle state, as EC2 names it (the type `status.instance.state` holds).
pub use crate::api::InstanceState;

/// A launch's turn in the client-side pacing of RunInstances ([`Ec2::launch_turn`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LaunchTurn {
    /// How long until the turn is due (zero: now).
    pub wait: Duration,
    /// When it is due, by the wall clock (fixed when the turn was taken).
    pub at: jiff::Timestamp,
}

/// What to launch. `Debug` leaves the user data out (it may hold secrets).
#[derive(Clone, PartialEq, Default)]
pub struct LaunchRequest {
    /// RunInstances' idempotency token (at most 64 ASCII characters), derived from the
    /// Sandbox's UID: a repeated launch answers the first one's instance.
    pub client_token: String,
    /// The AMI.
    pub image_id: String,
    /// The instance type.
    pub instance_type: String,
    /// The subnet; `None`: the default VPC's default subnet.
    pub subnet_id: Option<String>,
    /// Security groups; empty: the VPC's default.
    pub security_group_ids: Vec<String>,
    /// An EC2 key pair.
    pub key_name: Option<String>,
    /// An instance profile, by name or by ARN (`arn:...`).
    pub iam_instance_profile: Option<String>,
    /// The root volume's size (its device name comes from the AMI, one cached
    /// `DescribeImages` per AMI).
    pub root_volume_size_gib: Option<i32>,
    /// Spot: a persistent request that stops on interruption, so that the instance can be
    /// stopped and started like an on-demand one.
    pub spot: bool,
    /// User data, base64-encoded.
    pub user_data_base64: Option<String>,
    /// Tags for the instance and its volumes (TagSpecifications).
    pub tags: BTreeMap<String, String>,
}

impl std::fmt::Debug for LaunchRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchRequest")
            .field("client_token", &self.client_token)
            .field("image_id", &self.image_id)
            .field("instance_type", &self.instance_type)
            .field("subnet_id", &self.subnet_id)
            .field("security_group_ids", &self.security_group_ids)
            .field("key_name", &self.key_name)
            .field("iam_instance_profile", &self.iam_instance_profile)
            .field("root_volume_size_gib", &self.root_volume_size_gib)
            .field("spot", &self.spot)
            .field(
                "user_data_base64",
                &self.user_data_base64.as_ref().map(|_| "<redacted>"),
            )
            .field("tags", &self.tags)
            .finish()
    }
}

/// The client-side token buckets, one per category of call.
///
/// Defaults sit a little under AWS's documented per-account buckets (Amazon EC2 developer
/// guide, "Request throttling for the Amazon EC2 API"), at 90% of the refill rate, so that a
/// busy operator leaves the account's buckets some room.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimits {
    /// DescribeInstances and DescribeImages. Default 90 tokens, 18/s: AWS's bucket for
    /// describe calls with filters or pagination holds 100 and refills 20/s. Calls by
    /// `InstanceIds` (unfiltered, unpaginated) take 2 tokens, because AWS's bucket for those
    /// is half as large (50, 10/s).
    pub describe: RateLimit,
    /// StartInstances, StopInstances, TerminateInstances, CancelSpotInstanceRequests. Default
    /// 4 tokens, 1.8/s: the strictest of AWS's buckets for these, StartInstances' (5, 2/s;
    /// StopInstances draws on the mutating bucket, 50 and 5/s, TerminateInstances on its own,
    /// 100 and 5/s). Merged calls carry up to 1,000 instances each.
    pub mutate: RateLimit,
    /// RunInstances. Default 4 tokens, 1.8/s: AWS's RunInstances bucket holds 5 and refills
    /// 2/s.
    pub run: RateLimit,
    /// The longest a call waits for tokens before it gives up with [`Ec2Error::Paced`]
    /// (so a reconcile is not held for minutes; the controller requeues it). Default 60 s.
    pub max_wait: Duration,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            describe: RateLimit::new(90.0, 18.0),
            mutate: RateLimit::new(4.0, 1.8),
            run: RateLimit::new(4.0, 1.8),
            max_wait: Duration::from_secs(60),
        }
    }
}

impl RateLimits {
    /// These limits with some changed by `spec`, comma-separated `NAME=CAPACITY/PER_SECOND`
    /// for the buckets `describe`, `mutate` and `run`, and `max-wait=DURATION`; e.g.
    /// `run=9/4.5,describe=180/36` for an account whose AWS limits were raised. An empty spec
    /// changes nothing.
    pub fn with_overrides(mut self, spec: &str) -> Result<Self, String> {
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected NAME=CAPACITY/PER_SECOND"))?;
            let name = name.trim();
            if name == "max-wait" {
                self.max_wait = crate::util::parse_duration(value.trim())
                    .map_err(|e| format!("max-wait: {e}"))?;
                continue;
            }
            let bucket = match name {
                "describe" => &mut self.describe,
                "mutate" => &mut self.mutate,
                "run" => &mut self.run,
                other => {
                    return Err(format!(
                        "unknown bucket {other:?}: expected describe, mutate, run or max-wait"
                    ));
                }
            };
            let (capacity, rate) = value.split_once('/').ok_or_else(|| {
                format!("{name}={value}: expected CAPACITY/PER_SECOND, e.g. 4/1.8")
            })?;
            let number = |v: &str| {
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite() && *n > 0.0)
                    .ok_or_else(|| format!("{name}={value}: {v:?} is not a positive number"))
            };
            *bucket = RateLimit::new(number(capacity)?, number(rate)?);
        }
        Ok(self)
    }

    /// No client-side limits (the layer still retries AWS's throttling answers).
    pub fn unlimited() -> Self {
        Self {
            describe: RateLimit::UNLIMITED,
            mutate: RateLimit::UNLIMITED,
            run: RateLimit::UNLIMITED,
            max_wait: Duration::from_secs(60),
        }
    }
}

/// How the layer batches, refreshes and paces.
#[derive(Clone, Debug)]
pub struct Ec2Settings {
    /// Full refresh of the tracked instances. Default 30 s.
    pub refresh_interval: Duration,
    /// How long a batch collects requests after its first. Default 100 ms.
    pub batch_window: Duration,
    /// Most distinct keys (instance ids, UIDs) in one batch. Default 1,000.
    pub max_batch: usize,
    /// Client-side token buckets.
    pub buckets: RateLimits,
    /// Results asked per DescribeInstances page (`MaxResults`, 5 to 1,000). Default 1,000.
    pub page_size: i32,
}

impl Default for Ec2Settings {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(30),
            batch_window: Duration::from_millis(100),
            max_batch: 1000,
            buckets: RateLimits::default(),
            page_size: MAX_RESULTS,
        }
    }
}

/// The EC2 layer. Cheap to clone; its background tasks (batchers, the periodic refresh) stop
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Ec2 {
    inner: Arc<Inner>,
}

struct Inner {
    core: Arc<Core>,
    describe: Batcher<String, Result<Option<Instance>, Ec2Error>>,
    find: Batcher<String, Result<Option<Instance>, Ec2Error>>,
    start: Batcher<String, Result<(), Ec2Error>>,
    stop: Batcher<String, Result<(), Ec2Error>>,
    terminate: Batcher<String, Result<(), Ec2Error>>,
    /// Dropped with the last handle: ends the refresh task.
    _shutdown: mpsc::Sender<()>,
}

impl std::fmt::Debug for Ec2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2")
            .field("settings", &self.inner.core.settings)
            .finish_non_exhaustive()
    }
}

const GONE: &str = "the EC2 layer is shutting down";

impl Ec2 {
    /// Builds the layer over `client` and spawns its background tasks on the current tokio
    /// runtime (so it must be called inside one). The client's own retries are switched off
    /// (the layer retries, and counts every attempt); an attempt timeout of 30 s is set when
    /// the client has none.
    pub fn new(client: aws_sdk_ec2::Client, settings: Ec2Settings) -> Self {
        let client = without_sdk_retries(&client);
        let core = Arc::new(Core::new(client, settings.clone()));
        let window = settings.batch_window;
        let max = settings.max_batch.max(1);

        let c = core.clone();
        let describe = Batcher::spawn(
            window,
            max,
            Arc::new(move |ids| {
                let c = c.clone();
                Box::pin(async move { c.describe_batch(ids).await })
            }),
            |_| {
                Err(Ec2Error::Unavailable {
                    action: "DescribeInstances",
                    message: "no answer for this instance".to_owned(),
                })
            },
        );
        let c = core.clone();
        let find = Batcher::spawn(
            window,
            max,
            Arc::new(move |uids| {
                let c = c.clone();
                Box::pin(async move { c.find_batch(uids).await })
            }),
            |_| {
                Err(Ec2Error::Unavailable {
                    action: "DescribeInstances",
                    message: "no answer for this UID".to_owned(),
                })
            },
        );
        let power = |op: Power| {
            let c = core.clone();
            Batcher::spawn(
                window,
                max,
                Arc::new(move |ids| {
                    let c = c.clone();
                    Box::pin(async move { c.power_batch(op, ids).await })
                }),
                match op {
                    Power::Start => |_: &String| Err(no_answer("StartInstances")),
                    Power::Stop => |_: &String| Err(no_answer("StopInstances")),
                    Power::Terminate => |_: &String| Err(no_answer("TerminateInstances")),
                },
            )
        };
        let start = power(Power::Start);
        let stop = power(Power::Stop);
        let terminate = power(Power::Terminate);

        let (shutdown, closed) = mpsc::channel(1);
        tokio::spawn(engine::refresh_loop(
            core.clone(),
            settings.refresh_interval,
            closed,
        ));

        Self {
            inner: Arc::new(Inner {
                core,
                describe,
                find,
                start,
                stop,
                terminate,
                _shutdown: shutdown,
            }),
        }
    }

    /// The instance, observed no longer than `max_age` ago (`Duration::ZERO`: ask EC2 now).
    /// Concurrent callers within the batch window share one DescribeInstances. `Ok(None)`:
    /// EC2 does not know the id (an instance terminated more than about an hour ago, or never
    /// launched); an instance this layer launched moments ago is never reported unknown
    /// (EC2's eventual consistency). Registers the id as tracked. While the periodic refresh
    /// is under way, a lookup it will answer young enough waits for it instead of making a
    /// call of its own (at most one DescribeInstances per refresh for the tracked fleet). A
    /// malformed id is
    /// `Rejected` with `InvalidInstanceID.Malformed`, without a call.
    pub async fn describe(
        &self,
        id: &str,
        max_age: Duration,
    ) -> Result<Option<Instance>, Ec2Error> {
        if !error::is_instance_id(id) {
            return Err(engine::malformed("DescribeInstances", id));
        }
        if let Some(cached) = self.inner.core.track_and_lookup(id, max_age) {
            return Ok(cached);
        }
        if let Some(cached) = self.inner.core.await_refresh(id, max_age).await {
            return Ok(cached);
        }
        self.inner
            .describe
            .submit(id.to_owned())
            .await
            .unwrap_or_else(|| Err(unavailable("DescribeInstances")))
    }

    /// The newest pending, running, stopping or stopped instance tagged [`TAG_UID`]` = uid`
    /// (shutting-down and terminated ones do not count: they will not come back). Concurrent
    /// lookups share calls (up to 200 UIDs per DescribeInstances).
    pub async fn find_by_uid(&self, uid: &str) -> Result<Option<Instance>, Ec2Error> {
        self.inner
            .find
            .submit(uid.to_owned())
            .await
            .unwrap_or_else(|| Err(unavailable("DescribeInstances")))
    }

    /// RunInstances with the request's ClientToken (idempotent: a repeat answers the first
    /// launch's instance), one instance. Returns the instance as RunInstances reported it
    /// (with the requested tags when the answer omitted them), and tracks it. A launch that
    /// took its turn with [`Self::launch_turn`] goes when the turn is due (sleeping until
    /// then) on the token it took; any other waits for the RunInstances bucket like every
    /// call, or answers [`Ec2Error::Paced`] when that wait would exceed
    /// [`RateLimits::max_wait`].
    pub async fn launch(&self, req: &LaunchRequest) -> Result<Instance, Ec2Error> {
        self.inner.core.launch(req).await
    }

    /// Takes (or finds again) the launch's turn in the client-side pacing of RunInstances,
    /// by its ClientToken, without waiting: the caller comes back when the turn is due and
    /// calls [`Self::launch`] with the same token. Turns are handed out in the order asked
    /// for, up to 15 minutes ahead; beyond that, `Err(`[`Ec2Error::Paced`]`)` with how long
    /// until asking again makes sense. A turn unused two minutes after it fell due lapses.
    pub fn launch_turn(&self, client_token: &str) -> Result<LaunchTurn, Ec2Error> {
        self.inner
            .core
            .launch_turn(client_token)
            .map(|t| LaunchTurn {
                wait: t.due.saturating_duration_since(std::time::Instant::now()),
                at: t.at,
            })
    }

    /// The client-side buckets the layer paces its calls with.
    pub fn rate_limits(&self) -> &RateLimits {
        &self.inner.core.settings.buckets
    }

    /// Starts the instance (a no-op when it is pending or running). Merged with concurrent
    /// starts. An instance that is stopping answers `IncorrectState`.
    pub async fn start(&self, id: &str) -> Result<(), Ec2Error> {
        Self::power(&self.inner.start, "StartInstances", id).await
    }

    /// Stops the instance (a no-op when it is stopping or stopped). Merged with concurrent
    /// stops. A pending or terminated instance answers `IncorrectState`.
    pub async fn stop(&self, id: &str) -> Result<(), Ec2Error> {
        Self::power(&self.inner.stop, "StopInstances", id).await
    }

    /// Terminates the instance (a no-op when it is shutting down or terminated, and `Ok` when
    /// EC2 no longer knows it). A spot instance's persistent request is cancelled first.
    /// Merged with concurrent terminations.
    pub async fn terminate(&self, id: &str) -> Result<(), Ec2Error> {
        Self::power(&self.inner.terminate, "TerminateInstances", id).await
    }

    async fn power(
        batcher: &Batcher<String, Result<(), Ec2Error>>,
        action: &'static str,
        id: &str,
    ) -> Result<(), Ec2Error> {
        if !error::is_instance_id(id) {
            return Err(engine::malformed(action, id));
        }
        batcher
            .submit(id.to_owned())
            .await
            .unwrap_or_else(|| Err(unavailable(action)))
    }

    /// Every instance tagged [`TAG_MANAGED_BY`]` = `[`MANAGED_BY_VALUE`], in any state
    /// (terminated ones while EC2 still lists them), for the orphan sweep: paginated
    /// DescribeInstances, 1,000 per page.
    pub async fn list_managed(&self) -> Result<Vec<Instance>, Ec2Error> {
        self.inner.core.list_managed().await
    }

    /// The same list, taken by the next periodic refresh (which lists through the tag filter,
    /// or the whole region when that is its cheaper route, when asked), so a caller such as the
    /// orphan sweep adds no DescribeInstances of its own.
    /// Falls back to [`Ec2::list_managed`] without a refresh loop or when that refresh fails.
    pub async fn list_managed_at_next_refresh(&self) -> Result<Vec<Instance>, Ec2Error> {
        self.inner.core.list_managed_at_next_refresh().await
    }

    /// Removes the operator's ownership tags (managed-by, UID) from an instance a deleted
    /// Sandbox leaves behind (deletionPolicy Retain or Stop): it is no longer the operator's,
    /// and the orphan sweep leaves it alone. Stops tracking it.
    pub async fn release(&self, id: &str) -> Result<(), Ec2Error> {
        if !error::is_instance_id(id) {
            return Err(engine::malformed("DeleteTags", id));
        }
        self.inner.core.release(id).await
    }

    /// Stops tracking `id` (its Sandbox is gone) and forgets what was observed of it.
    pub fn untrack(&self, id: &str) {
        self.inner.core.untrack(id);
    }

    /// Ids of tracked instances whose observation changed (state, addresses, anything
    /// reported), seen by the periodic refresh, a describe or a start/stop/terminate answer.
    /// Any number of subscribers; each sees the changes after it subscribed. A subscriber that
    /// falls more than 16,384 ids behind misses some: it is then handed every tracked id
    /// instead (a full resync), so nothing is lost, only repeated. The stream ends when the
    /// layer is dropped.
    pub fn changes(&self) -> impl futures::Stream<Item = String> + Send + Unpin + 'static {
        engine::changes_stream(&self.inner.core)
    }

    /// Registers `ec2_api_calls` (counter; labels `action` = the EC2 action, `outcome` = ok,
    /// throttled (by AWS) or error; every attempt counts), `ec2_client_paced` and
    /// `ec2_client_paced_wait_seconds` (counters: the operator's own pacing, by action and
    /// outcome) and `ec2_tracked_instances` (gauge). Call it once per registry.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.core.metrics.register(registry);
    }

    /// Attempts made per EC2 action so far, every outcome and retry included (the same
    /// counters as `ec2_api_calls`).
    pub fn call_counts(&self) -> BTreeMap<String, u64> {
        self.inner.core.metrics.counts()
    }

    /// Calls the client-side pacing held back, per `Action/outcome` (`waited`, `refused`,
    /// `queued`; the same counters as `ec2_client_paced`). AWS's throttling is not here: it
    /// is in [`Self::call_counts`] and `ec2_api_calls{outcome="throttled"}`.
    pub fn paced_counts(&self) -> BTreeMap<String, u64> {
        self.inner.core.metrics.paced_counts()
    }

    /// Runs one periodic refresh now (tests and the bench; the background task runs it every
    /// `refresh_interval`).
    pub async fn refresh_now(&self) {
        self.inner.core.refresh().await;
    }

    /// Instances tracked.
    pub fn tracked(&self) -> usize {
        self.inner.core.tracked()
    }
}

fn unavailable(action: &'static str) -> Ec2Error {
    Ec2Error::Unavailable {
        action,
        message: GONE.to_owned(),
    }
}

fn no_answer(action: &'static str) -> Ec2Error {
    Ec2Error::Unavailable {
        action,
        message: "no answer for this instance".to_owned(),
    }
}

/// The SDK's attempt timeout when the client has none.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// The connect timeout of clients built by [`sdk_client`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn without_sdk_retries(client: &aws_sdk_ec2::Client) -> aws_sdk_ec2::Client {
    let config = client.config();
    let timeouts = match config.timeout_config() {
        Some(t) if t.operation_attempt_timeout().is_some() => t.clone(),
        Some(t) => t
            .to_builder()
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .build(),
        None => TimeoutConfig::builder()
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .build(),
    };
    let config = config
        .to_builder()
        .retry_config(RetryConfig::disabled())
        .timeout_config(timeouts)
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

/// An SDK client for an endpoint override (tests, moto: `Some(url)`) or real AWS (`None`),
/// with the default credential chain, `region` or the default region chain, the SDK's retries
/// off (the layer retries) and connect/attempt timeouts of 5 s / 30 s.
pub async fn sdk_client(endpoint_url: Option<&str>, region: Option<&str>) -> aws_sdk_ec2::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .build(),
        );
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region.to_owned()));
    }
    aws_sdk_ec2::Client::new(&loader.load().await)
}

/// Capacity of the changes channel (per subscriber backlog).
const CHANGES_CAPACITY: usize = 16_384;

fn changes_channel() -> broadcast::Sender<String> {
    broadcast::channel(CHANGES_CAPACITY).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names() {
        for s in [
            InstanceState::Pending,
            InstanceState::Running,
            InstanceState::Stopping,
            InstanceState::Stopped,
            InstanceState::ShuttingDown,
            InstanceState::Terminated,
        ] {
            assert_eq!(InstanceState::parse(s.as_str()), Some(s));
        }
        assert_eq!(InstanceState::ShuttingDown.to_string(), "shutting-down");
        assert!(InstanceState::Stopping.is_transitional());
        assert!(!InstanceState::Stopped.is_transitional());
        assert!(InstanceState::ShuttingDown.is_terminal());
        assert_eq!(InstanceState::parse("rebooting"), None);
    }

    #[test]
    fn launch_requests_do_not_print_user_data() {
        let req = LaunchRequest {
            user_data_base64: Some("c2VjcmV0".to_owned()),
            ..Default::default()
        };
        let printed = format!("{req:?}");
        assert!(!printed.contains("c2VjcmV0"), "{printed}");
        assert!(printed.contains("<redacted>"));
    }

    #[test]
    fn bucket_overrides_parse_and_refuse_nonsense() {
        let b = RateLimits::default()
            .with_overrides("run=1/0.2, describe=180/36,max-wait=5s")
            .unwrap();
        assert_eq!(b.run, RateLimit::new(1.0, 0.2));
        assert_eq!(b.describe, RateLimit::new(180.0, 36.0));
        assert_eq!(b.mutate, RateLimits::default().mutate);
        assert_eq!(b.max_wait, Duration::from_secs(5));
        assert_eq!(
            RateLimits::default().with_overrides("").unwrap(),
            RateLimits::default()
        );
        for bad in [
            "run=1",
            "run=0/1",
            "runs=1/1",
            "run",
            "describe=a/1",
            "max-wait=x",
        ] {
            assert!(
                RateLimits::default().with_overrides(bad).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn default_buckets_sit_under_aws_buckets() {
        let b = RateLimits::default();
        assert!(b.describe.capacity < 100.0 && b.describe.refill_per_second < 20.0);
        assert!(b.mutate.capacity <= 5.0 && b.mutate.refill_per_second < 2.0);
        assert!(b.run.capacity <= 5.0 && b.run.refill_per_second < 2.0);
    }
}
