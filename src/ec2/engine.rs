//! The layer's moving parts: the paced, retried call; the batch handlers behind the public
//! methods; the periodic refresh; the changes stream.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{Filter, InstanceStateChange, Reservation};
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, warn};

use super::batch::chunks;
use super::cache::Cache;
use super::convert;
use super::error::{Class, Failure, is_instance_id};
use super::limiter::{Limiter, Reservation as Pacing, backoff, jitter};
use super::metrics::{Metrics, Outcome, Paced};
use super::{
    Ec2Error, Ec2Settings, Instance, InstanceState, LaunchRequest, MANAGED_BY_VALUE,
    MAX_FILTER_VALUES, MAX_IDS_PER_CALL, MAX_RESULTS, TAG_MANAGED_BY, TAG_UID,
};

/// Attempts per call, the first included, for throttling and server trouble.
const MAX_ATTEMPTS: u32 = 5;
/// Backoff before the first retry (then doubling: 250 ms, 0.5 s, 1 s, 2 s, with jitter).
const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Longest backoff between two attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(8);
/// Tokens a DescribeInstances by `InstanceIds` takes (AWS's bucket for unfiltered,
/// unpaginated describes is half the size of the one for filtered ones).
const UNFILTERED_COST: f64 = 2.0;
/// How far ahead a launch may take its turn in the client-side pacing of RunInstances (the
/// caller does not sleep meanwhile; it comes back when the turn is due). Beyond it the launch
/// is refused with `Ec2Error::Paced` and asks again later.
pub(crate) const LAUNCH_QUEUE_BOUND: Duration = Duration::from_secs(15 * 60);
/// A turn not used this long after it fell due is given up (its Sandbox went away, say).
const TURN_EXPIRY: Duration = Duration::from_secs(120);

/// A launch's turn in the client-side pacing of RunInstances: its token is taken.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Turn {
    pub due: Instant,
    pub at: jiff::Timestamp,
}

/// Start, stop or terminate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Power {
    Start,
    Stop,
    Terminate,
}

impl Power {
    fn action(self) -> &'static str {
        match self {
            Self::Start => "StartInstances",
            Self::Stop => "StopInstances",
            Self::Terminate => "TerminateInstances",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Bucket {
    Describe,
    Mutate,
    Run,
}

/// What a describe of some ids found.
#[derive(Debug, Default)]
struct DescribeOutcome {
    found: HashMap<String, Instance>,
    /// Ids refused as such (malformed).
    rejected: HashMap<String, Ec2Error>,
}

/// One AMI's root device lookup: set once by whichever caller runs the DescribeImages; every
/// caller that arrives meanwhile awaits the same answer (a cancelled runner hands over to a
/// waiter).
type ImageLookup = tokio::sync::OnceCell<Result<String, Ec2Error>>;

/// Everything the background tasks share.
pub(crate) struct Core {
    client: aws_sdk_ec2::Client,
    pub(crate) settings: Ec2Settings,
    describe_limiter: Limiter,
    mutate_limiter: Limiter,
    run_limiter: Limiter,
    cache: Mutex<Cache>,
    pub(crate) metrics: Metrics,
    changes: broadcast::Sender<String>,
    /// Root device name per AMI: one lookup per AMI, shared by every caller that asks while
    /// it is in flight (single-flight). A found name stays; a failed lookup is dropped once
    /// its call is over, so the next launch asks again.
    root_devices: Mutex<HashMap<String, Arc<ImageLookup>>>,
    /// Turns taken in the RunInstances pacing, by ClientToken.
    turns: Mutex<HashMap<String, Turn>>,
    /// When the refresh under way started (its observations carry that time); `None` while no
    /// refresh runs. A lookup that finds its instance too old waits for that refresh rather
    /// than asking EC2 itself (single-flight between the refresh and the describe batcher).
    refreshing: tokio::sync::watch::Sender<Option<Instant>>,
    /// When the next periodic refresh is due (`None`: no refresh loop runs).
    next_refresh: Mutex<Option<Instant>>,
    /// Set by a caller that wants the next refresh to list every managed instance (the orphan
    /// sweep), so the sweep makes no DescribeInstances of its own.
    want_managed: std::sync::atomic::AtomicBool,
    /// The last list of managed instances a refresh made on request, with its start time.
    managed_list: ManagedList,
    /// Pages the region's instances took when a refresh last listed them all (exactly, or at
    /// least, when it gave up); 0 while not known.
    region_pages: std::sync::atomic::AtomicUsize,
}

/// A refresh's list of managed instances, with the time the refresh started.
type ManagedList = tokio::sync::watch::Sender<Option<(Instant, Arc<Vec<Instance>>)>>;

/// How long a caller waits past the next refresh's due time for its managed list before it
/// lists the instances itself.
const MANAGED_LIST_PATIENCE: Duration = Duration::from_secs(15);

/// A caller lists the managed instances itself rather than wait longer than this for the next
/// refresh (a long `--ec2-refresh`).
const MANAGED_LIST_MAX_WAIT: Duration = Duration::from_secs(60);

/// A lookup that finds its instance too old when the next refresh is due within this long (or
/// overdue: its tick fired and the refresh has not started yet) waits for that refresh.
const REFRESH_DUE_SOON: Duration = Duration::from_secs(1);

/// Marks a refresh as over when dropped (finished, failed or cancelled).
struct RefreshUnderWay<'a>(&'a tokio::sync::watch::Sender<Option<Instant>>);

impl Drop for RefreshUnderWay<'_> {
    fn drop(&mut self) {
        self.0.send_replace(None);
    }
}

/// The error for an id that is not an instance id, as EC2 words it.
pub(crate) fn malformed(action: &'static str, id: &str) -> Ec2Error {
    Ec2Error::Rejected {
        action,
        code: "InvalidInstanceID.Malformed".to_owned(),
        message: format!("Invalid id: \"{id}\" (expecting \"i-...\")"),
        request_id: None,
    }
}

impl Core {
    pub(crate) fn new(client: aws_sdk_ec2::Client, settings: Ec2Settings) -> Self {
        let b = &settings.buckets;
        Self {
            client,
            describe_limiter: Limiter::new(b.describe, b.max_wait),
            mutate_limiter: Limiter::new(b.mutate, b.max_wait),
            run_limiter: Limiter::new(b.run, b.max_wait),
            settings,
            cache: Mutex::new(Cache::default()),
            metrics: Metrics::default(),
            changes: super::changes_channel(),
            root_devices: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
            refreshing: tokio::sync::watch::channel(None).0,
            next_refresh: Mutex::new(None),
            want_managed: std::sync::atomic::AtomicBool::new(false),
            managed_list: tokio::sync::watch::channel(None).0,
            region_pages: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().expect("EC2 cache lock")
    }

    fn limiter(&self, bucket: Bucket) -> &Limiter {
        match bucket {
            Bucket::Describe => &self.describe_limiter,
            Bucket::Mutate => &self.mutate_limiter,
            Bucket::Run => &self.run_limiter,
        }
    }

    /// `MaxResults` of a DescribeInstances page.
    fn page_size(&self) -> i32 {
        self.settings.page_size.clamp(5, MAX_RESULTS)
    }

    fn ids_per_call(&self) -> usize {
        self.settings.max_batch.clamp(1, MAX_IDS_PER_CALL)
    }

    pub(crate) fn tracked(&self) -> usize {
        self.cache().len()
    }

    /// Tracks `id` and answers from the view if its observation is young enough.
    pub(crate) fn track_and_lookup(&self, id: &str, max_age: Duration) -> Option<Option<Instance>> {
        let (hit, len) = {
            let mut cache = self.cache();
            cache.track(id);
            (cache.fresh(id, max_age, Instant::now()), cache.len())
        };
        self.metrics.set_tracked(len);
        hit
    }

    /// After [`Core::track_and_lookup`] found `id` older than `max_age`: when a refresh under
    /// way (or due within [`REFRESH_DUE_SOON`]) will observe it young enough, waits for that
    /// refresh (at most `max_age`, at least
    /// one second) and answers from the view; otherwise answers from the view at once (a
    /// refresh may have landed meanwhile). `None`: the caller must ask EC2.
    pub(crate) async fn await_refresh(
        &self,
        id: &str,
        max_age: Duration,
    ) -> Option<Option<Instance>> {
        let mut rx = self.refreshing.subscribe();
        let mut under_way = *rx.borrow_and_update();
        let due = *self.next_refresh.lock().expect("next refresh lock");
        if under_way.is_none()
            && let Some(due) = due
            && due.saturating_duration_since(Instant::now()) <= REFRESH_DUE_SOON
            && self.cache().covered_by_refresh(id, Instant::now())
        {
            // Its tick is (about to be) due: wait for it to start, then for it to end.
            let _ = tokio::time::timeout(
                due.saturating_duration_since(Instant::now()) + REFRESH_DUE_SOON,
                rx.wait_for(Option::is_some),
            )
            .await;
            under_way = *rx.borrow_and_update();
        }
        if let Some(started) = under_way
            && Instant::now().saturating_duration_since(started) < max_age
            && self.cache().covered_by_refresh(id, started)
        {
            let _ = tokio::time::timeout(
                max_age.max(Duration::from_secs(1)),
                rx.wait_for(|s| *s != Some(started)),
            )
            .await;
        }
        self.cache().fresh(id, max_age, Instant::now())
    }

    pub(crate) fn untrack(&self, id: &str) {
        let len = {
            let mut cache = self.cache();
            cache.untrack(id);
            cache.len()
        };
        self.metrics.set_tracked(len);
    }

    /// Applies an observation to the view; announces a change; answers what callers see.
    fn observe(&self, id: &str, instance: Option<Instance>, at: Instant) -> Option<Instance> {
        let applied = self.cache().observe(id, instance, at, Instant::now());
        if applied.changed {
            let _ = self.changes.send(id.to_owned());
        }
        applied.instance
    }

    fn record_state(&self, id: &str, state: InstanceState, at: Instant) {
        let changed = self.cache().record_state(id, state, at);
        if changed {
            let _ = self.changes.send(id.to_owned());
        }
    }

    /// Converts the instances of DescribeInstances pages, noting spot requests.
    fn ingest<'a>(&self, reservations: impl IntoIterator<Item = &'a Reservation>) -> Vec<Instance> {
        self.ingest_noting(reservations, |_| true)
    }

    /// [`Core::ingest`], noting the spot requests only of the instances `concerns` picks (a
    /// listing of the whole region sees other parties' spot instances).
    fn ingest_noting<'a>(
        &self,
        reservations: impl IntoIterator<Item = &'a Reservation>,
        concerns: impl Fn(&Instance) -> bool,
    ) -> Vec<Instance> {
        let mut out = Vec::new();
        let mut spot = Vec::new();
        for reservation in reservations {
            for sdk in reservation.instances() {
                if let Some((instance, request)) = convert::instance(sdk) {
                    if let Some(request) = request
                        && instance.state != InstanceState::Terminated
                        && concerns(&instance)
                    {
                        spot.push((instance.id.clone(), request));
                    }
                    out.push(instance);
                }
            }
        }
        if !spot.is_empty() {
            let mut cache = self.cache();
            for (id, request) in spot {
                cache.note_spot_request(&id, &request);
            }
        }
        out
    }

    /// Waits for `cost` tokens of `bucket` for one attempt of `action`; counts and logs the
    /// wait as the operator's own pacing (never as throttling: nothing was sent yet).
    /// `Err(Paced)` when the wait would exceed the bound.
    pub(crate) async fn pace(
        &self,
        action: &'static str,
        bucket: Bucket,
        cost: f64,
    ) -> Result<(), Ec2Error> {
        match self.limiter(bucket).acquire(cost).await {
            Pacing::Wait(d) if d.is_zero() => Ok(()),
            Pacing::Wait(d) => {
                self.metrics.paced(action, Paced::Waited, d);
                Ok(())
            }
            Pacing::Refused(wait) => {
                self.metrics.paced(action, Paced::Refused, wait);
                debug!(
                    action,
                    ?wait,
                    "held back by the operator's client-side pacing (not sent; AWS throttled nothing)"
                );
                Err(Ec2Error::Paced { action, wait })
            }
        }
    }

    /// One EC2 call: paced by the bucket, retried with backoff on throttling and server
    /// trouble, every attempt counted. `instance` names the instance of a one-instance call.
    async fn call<T, E, F, Fut>(
        &self,
        action: &'static str,
        bucket: Bucket,
        cost: f64,
        instance: Option<&str>,
        send: F,
    ) -> Result<T, Ec2Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        self.call_prepaid(action, bucket, cost, instance, false, send)
            .await
    }

    /// [`Self::call`], with the first attempt's tokens already taken when `prepaid` (a launch
    /// whose turn came).
    async fn call_prepaid<T, E, F, Fut>(
        &self,
        action: &'static str,
        bucket: Bucket,
        cost: f64,
        instance: Option<&str>,
        prepaid: bool,
        mut send: F,
    ) -> Result<T, Ec2Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let limiter = self.limiter(bucket);
        let mut attempt = 0;
        loop {
            attempt += 1;
            if !(prepaid && attempt == 1) {
                self.pace(action, bucket, cost).await?;
            }
            let err = match send().await {
                Ok(out) => {
                    self.metrics.call(action, Outcome::Ok);
                    return Ok(out);
                }
                Err(err) => err,
            };
            let failure = Failure::from_sdk(&err);
            if failure.class == Class::Throttled {
                self.metrics.call(action, Outcome::Throttled);
                limiter.drain();
            } else {
                self.metrics.call(action, Outcome::Error);
            }
            if failure.class.retry_here() && attempt < MAX_ATTEMPTS {
                let delay = backoff(attempt - 1, BACKOFF_BASE, BACKOFF_CAP, jitter());
                if failure.class == Class::Throttled {
                    debug!(
                        action,
                        attempt,
                        code = failure.code.as_deref().unwrap_or(""),
                        ?delay,
                        "throttled by AWS (the account's request rate limit); retrying"
                    );
                } else {
                    debug!(
                        action,
                        attempt,
                        code = failure.code.as_deref().unwrap_or(""),
                        message = %failure.message,
                        ?delay,
                        "transient EC2 error; retrying"
                    );
                }
                tokio::time::sleep(delay).await;
                continue;
            }
            return Err(failure.into_error(action, instance));
        }
    }

    /// This launch's turn in the client-side pacing of RunInstances (ClientToken
    /// `client_token`): the one it took earlier, or a new one (its token is taken now, so
    /// launches go in the order they asked). `Err(Paced)` when the line is longer than
    /// [`LAUNCH_QUEUE_BOUND`].
    pub(crate) fn launch_turn(&self, client_token: &str) -> Result<Turn, Ec2Error> {
        let now = Instant::now();
        let mut turns = self.turns.lock().expect("turns lock");
        turns.retain(|_, t| now.saturating_duration_since(t.due) < TURN_EXPIRY);
        if let Some(turn) = turns.get(client_token) {
            return Ok(*turn);
        }
        match self.run_limiter.reserve(1.0, LAUNCH_QUEUE_BOUND) {
            Pacing::Wait(wait) => {
                if !wait.is_zero() {
                    self.metrics.paced("RunInstances", Paced::Queued, wait);
                }
                let at = jiff::Timestamp::now()
                    .checked_add(jiff::SignedDuration::try_from(wait).unwrap_or_default())
                    .unwrap_or_else(|_| jiff::Timestamp::now());
                let turn = Turn {
                    due: now + wait,
                    at,
                };
                turns.insert(client_token.to_owned(), turn);
                Ok(turn)
            }
            Pacing::Refused(wait) => {
                self.metrics.paced("RunInstances", Paced::Refused, wait);
                debug!(
                    ?wait,
                    "launch held back by the operator's client-side pacing (not sent; AWS throttled nothing)"
                );
                Err(Ec2Error::Paced {
                    action: "RunInstances",
                    wait: wait.saturating_sub(LAUNCH_QUEUE_BOUND),
                })
            }
        }
    }

    /// Paginated, filtered DescribeInstances (1,000 per page unless set otherwise).
    async fn describe_pages(&self, filters: Vec<Filter>) -> Result<Vec<Instance>, Ec2Error> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .call("DescribeInstances", Bucket::Describe, 1.0, None, || {
                    self.client
                        .describe_instances()
                        .set_filters(Some(filters.clone()))
                        .max_results(self.page_size())
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
            out.extend(self.ingest(page.reservations()));
            match page.next_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => return Ok(out),
            }
        }
    }

    /// Describes `ids`: up to 200 with one `instance-id`-filtered call (unknown ids are simply
    /// absent), more by `InstanceIds` in calls of up to 1,000, dropping the ids that an
    /// `InvalidInstanceID.NotFound` names and asking again.
    async fn describe_ids(&self, ids: &[String]) -> Result<DescribeOutcome, Ec2Error> {
        let mut outcome = DescribeOutcome::default();
        let mut valid = Vec::with_capacity(ids.len());
        for id in ids {
            if is_instance_id(id) {
                valid.push(id.clone());
            } else {
                outcome
                    .rejected
                    .insert(id.clone(), malformed("DescribeInstances", id));
            }
        }
        if valid.is_empty() {
            return Ok(outcome);
        }
        if valid.len() <= MAX_FILTER_VALUES {
            self.describe_filtered(valid, &mut outcome).await?;
        } else {
            for chunk in chunks(&valid, self.ids_per_call()) {
                self.describe_by_ids(chunk, &mut outcome).await?;
            }
        }
        Ok(outcome)
    }

    async fn describe_filtered(
        &self,
        ids: Vec<String>,
        outcome: &mut DescribeOutcome,
    ) -> Result<(), Ec2Error> {
        for chunk in chunks(&ids, MAX_FILTER_VALUES) {
            let found = self
                .describe_pages(vec![convert::filter("instance-id", chunk)])
                .await?;
            outcome
                .found
                .extend(found.into_iter().map(|i| (i.id.clone(), i)));
        }
        Ok(())
    }

    async fn describe_by_ids(
        &self,
        mut remaining: Vec<String>,
        outcome: &mut DescribeOutcome,
    ) -> Result<(), Ec2Error> {
        while !remaining.is_empty() {
            let result = self
                .call(
                    "DescribeInstances",
                    Bucket::Describe,
                    UNFILTERED_COST,
                    None,
                    || {
                        self.client
                            .describe_instances()
                            .set_instance_ids(Some(remaining.clone()))
                            .send()
                    },
                )
                .await;
            match result {
                Ok(out) => {
                    let found = self.ingest(out.reservations());
                    outcome
                        .found
                        .extend(found.into_iter().map(|i| (i.id.clone(), i)));
                    return Ok(());
                }
                Err(err)
                    if matches!(
                        err.code(),
                        Some("InvalidInstanceID.NotFound" | "InvalidInstanceID.Malformed")
                    ) =>
                {
                    let named: HashSet<String> = err
                        .instance_ids()
                        .into_iter()
                        .filter(|id| remaining.contains(id))
                        .collect();
                    if named.is_empty() {
                        // The message does not say which: ask with filters, which ignore
                        // unknown ids.
                        return self.describe_filtered(remaining, outcome).await;
                    }
                    debug!(unknown = ?named, "DescribeInstances named unknown ids; asking again without them");
                    if err.code() == Some("InvalidInstanceID.Malformed") {
                        for id in &named {
                            outcome.rejected.insert(id.clone(), err.clone());
                        }
                    }
                    remaining.retain(|id| !named.contains(id));
                }
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// The describe batcher's handler.
    pub(crate) async fn describe_batch(
        &self,
        ids: Vec<String>,
    ) -> HashMap<String, Result<Option<Instance>, Ec2Error>> {
        let at = Instant::now();
        match self.describe_ids(&ids).await {
            Ok(mut outcome) => ids
                .into_iter()
                .map(|id| {
                    let result = match outcome.rejected.remove(&id) {
                        Some(err) => Err(err),
                        None => Ok(self.observe(&id, outcome.found.remove(&id), at)),
                    };
                    (id, result)
                })
                .collect(),
            Err(err) => ids.into_iter().map(|id| (id, Err(err.clone()))).collect(),
        }
    }

    /// The find-by-UID batcher's handler: one call per 200 UIDs.
    pub(crate) async fn find_batch(
        &self,
        uids: Vec<String>,
    ) -> HashMap<String, Result<Option<Instance>, Ec2Error>> {
        let mut results = HashMap::new();
        for chunk in chunks(&uids, MAX_FILTER_VALUES) {
            let at = Instant::now();
            let filters = vec![
                convert::filter(&format!("tag:{TAG_UID}"), chunk.clone()),
                convert::filter("instance-state-name", convert::LIVE_STATES),
            ];
            match self.describe_pages(filters).await {
                Ok(found) => {
                    let mut newest: HashMap<String, Instance> = HashMap::new();
                    for instance in found {
                        let instance = match self.observe(&instance.id.clone(), Some(instance), at)
                        {
                            Some(i) => i,
                            None => continue,
                        };
                        let Some(uid) = instance.tags.get(TAG_UID).cloned() else {
                            continue;
                        };
                        match newest.get(&uid) {
                            Some(best) if !is_newer(&instance, best) => {}
                            _ => {
                                newest.insert(uid, instance);
                            }
                        }
                    }
                    for uid in chunk {
                        // EC2 may not list an instance by its tags for a while after
                        // RunInstances (eventual consistency): one this layer launched moments
                        // ago is found all the same, so it is never launched twice.
                        let found = newest.remove(&uid).or_else(|| {
                            self.cache()
                                .recently_launched_with_tag(TAG_UID, &uid, Instant::now())
                        });
                        results.insert(uid, Ok(found));
                    }
                }
                Err(err) => {
                    for uid in chunk {
                        results.insert(uid, Err(err.clone()));
                    }
                }
            }
        }
        results
    }

    /// The start/stop/terminate batchers' handler: one call per 1,000 ids; ids that make the
    /// merged call fail are told apart and the others sent again.
    pub(crate) async fn power_batch(
        &self,
        op: Power,
        ids: Vec<String>,
    ) -> HashMap<String, Result<(), Ec2Error>> {
        let mut results = HashMap::new();
        let mut valid = Vec::with_capacity(ids.len());
        for id in ids {
            if is_instance_id(&id) {
                valid.push(id);
            } else {
                let err = malformed(op.action(), &id);
                results.insert(id, Err(err));
            }
        }
        if op == Power::Terminate {
            valid = self.cancel_spot_requests(valid, &mut results).await;
        }
        for mut remaining in chunks(&valid, self.ids_per_call()) {
            while !remaining.is_empty() {
                let at = Instant::now();
                let err = match self.power_call(op, &remaining).await {
                    Ok(changes) => {
                        for (id, state) in changes {
                            self.record_state(&id, state, at);
                        }
                        for id in remaining.drain(..) {
                            results.insert(id, Ok(()));
                        }
                        break;
                    }
                    Err(err) => err,
                };
                if !may_concern_some(&err) {
                    for id in remaining.drain(..) {
                        results.insert(id, Err(err.clone()));
                    }
                    break;
                }
                if let [only] = remaining.as_slice() {
                    let outcome = self.per_instance(op, only, err);
                    results.insert(only.clone(), outcome);
                    break;
                }
                let named: HashSet<String> = err
                    .instance_ids()
                    .into_iter()
                    .filter(|id| remaining.contains(id))
                    .collect();
                if named.is_empty() {
                    // Cannot tell which instance the error is about: one call each.
                    debug!(action = op.action(), code = ?err.code(), "merged call failed; falling back to one call per instance");
                    let singles = futures::future::join_all(
                        remaining.iter().map(|id| self.power_one(op, id)),
                    )
                    .await;
                    for (id, outcome) in remaining.drain(..).zip(singles) {
                        results.insert(id, outcome);
                    }
                    break;
                }
                debug!(action = op.action(), code = ?err.code(), instances = ?named, "merged call failed for some instances; sending the others again");
                for id in &named {
                    results.insert(id.clone(), self.per_instance(op, id, err.clone()));
                }
                remaining.retain(|id| !named.contains(id));
            }
        }
        results
    }

    async fn power_call(
        &self,
        op: Power,
        ids: &[String],
    ) -> Result<Vec<(String, InstanceState)>, Ec2Error> {
        let instance = match ids {
            [one] => Some(one.as_str()),
            _ => None,
        };
        let list = Some(ids.to_vec());
        let action = op.action();
        let changes: Vec<InstanceStateChange> = match op {
            Power::Start => self
                .call(action, Bucket::Mutate, 1.0, instance, || {
                    self.client
                        .start_instances()
                        .set_instance_ids(list.clone())
                        .send()
                })
                .await?
                .starting_instances()
                .to_vec(),
            Power::Stop => self
                .call(action, Bucket::Mutate, 1.0, instance, || {
                    self.client
                        .stop_instances()
                        .set_instance_ids(list.clone())
                        .send()
                })
                .await?
                .stopping_instances()
                .to_vec(),
            Power::Terminate => self
                .call(action, Bucket::Mutate, 1.0, instance, || {
                    self.client
                        .terminate_instances()
                        .set_instance_ids(list.clone())
                        .send()
                })
                .await?
                .terminating_instances()
                .to_vec(),
        };
        Ok(changes.iter().filter_map(convert::state_change).collect())
    }

    async fn power_one(&self, op: Power, id: &str) -> Result<(), Ec2Error> {
        let at = Instant::now();
        match self.power_call(op, &[id.to_owned()]).await {
            Ok(changes) => {
                for (id, state) in changes {
                    self.record_state(&id, state, at);
                }
                Ok(())
            }
            Err(err) => self.per_instance(op, id, err),
        }
    }

    /// What an error that concerns one instance means for it.
    fn per_instance(&self, op: Power, id: &str, err: Ec2Error) -> Result<(), Ec2Error> {
        if err.code() == Some("InvalidInstanceID.NotFound") {
            if self.cache().recently_launched(id, Instant::now()) {
                return Err(Ec2Error::IncorrectState {
                    action: op.action(),
                    instance_id: id.to_owned(),
                    message: format!(
                        "instance {id} was launched moments ago and EC2 does not show it yet"
                    ),
                });
            }
            if op == Power::Terminate {
                // Gone for good: what terminating wanted.
                return Ok(());
            }
        }
        match err {
            Ec2Error::IncorrectState {
                action, message, ..
            } => Err(Ec2Error::IncorrectState {
                action,
                instance_id: id.to_owned(),
                message,
            }),
            other => Err(other),
        }
    }

    /// Cancels the persistent spot requests behind instances about to be terminated (else
    /// EC2 would launch replacements). Returns the ids that may go on to be terminated.
    async fn cancel_spot_requests(
        &self,
        ids: Vec<String>,
        results: &mut HashMap<String, Result<(), Ec2Error>>,
    ) -> Vec<String> {
        let requests: Vec<(String, String)> = {
            let cache = self.cache();
            ids.iter()
                .filter_map(|id| cache.spot_request(id).map(|r| (id.clone(), r)))
                .collect()
        };
        if requests.is_empty() {
            return ids;
        }
        let mut failed: HashSet<String> = HashSet::new();
        match self.cancel(&requests).await {
            Ok(()) => {}
            Err(err)
                if requests.len() > 1
                    && err
                        .code()
                        .is_some_and(|c| c.starts_with("InvalidSpotInstanceRequestID")) =>
            {
                // One unknown request fails them all: cancel one by one.
                for one in &requests {
                    if let Err(err) = self.cancel(std::slice::from_ref(one)).await {
                        failed.insert(one.0.clone());
                        results.insert(one.0.clone(), Err(err));
                    }
                }
            }
            Err(err) => {
                for (id, _) in &requests {
                    failed.insert(id.clone());
                    results.insert(id.clone(), Err(err.clone()));
                }
            }
        }
        ids.into_iter().filter(|id| !failed.contains(id)).collect()
    }

    /// Cancels the spot requests of `group` (instance id, request id); an unknown request of
    /// a one-request group counts as cancelled.
    async fn cancel(&self, group: &[(String, String)]) -> Result<(), Ec2Error> {
        let request_ids: Vec<String> = group.iter().map(|(_, r)| r.clone()).collect();
        let result = self
            .call(
                "CancelSpotInstanceRequests",
                Bucket::Mutate,
                1.0,
                None,
                || {
                    self.client
                        .cancel_spot_instance_requests()
                        .set_spot_instance_request_ids(Some(request_ids.clone()))
                        .send()
                },
            )
            .await;
        let gone = match &result {
            Ok(_) => true,
            Err(err) => {
                group.len() == 1
                    && err
                        .code()
                        .is_some_and(|c| c.starts_with("InvalidSpotInstanceRequestID"))
            }
        };
        if gone {
            let mut cache = self.cache();
            for (id, _) in group {
                cache.forget_spot_request(id);
            }
            return Ok(());
        }
        result.map(drop)
    }

    pub(crate) async fn launch(&self, req: &LaunchRequest) -> Result<Instance, Ec2Error> {
        let root_device = match req.root_volume_size_gib {
            Some(_) => Some(self.root_device_name(&req.image_id).await?),
            None => None,
        };
        // A launch that took its turn in line earlier goes when the turn is due, on the token
        // it took then.
        let turn = self
            .turns
            .lock()
            .expect("turns lock")
            .remove(&req.client_token);
        if let Some(turn) = turn {
            tokio::time::sleep_until(turn.due.into()).await;
        }
        let at = Instant::now();
        let out = self
            .call_prepaid(
                "RunInstances",
                Bucket::Run,
                1.0,
                None,
                turn.is_some(),
                || {
                    convert::run_instances(self.client.run_instances(), req, root_device.as_deref())
                        .send()
                },
            )
            .await?;
        let Some((mut instance, spot_request)) =
            out.instances().first().and_then(convert::instance)
        else {
            return Err(Ec2Error::Unavailable {
                action: "RunInstances",
                message: "RunInstances answered without an instance".to_owned(),
            });
        };
        if instance.tags.is_empty() {
            instance.tags = req.tags.clone();
        }
        let len = {
            let mut cache = self.cache();
            if let Some(request) = spot_request {
                cache.note_spot_request(&instance.id, &request);
            }
            cache.launched(&instance, at);
            cache.len()
        };
        self.metrics.set_tracked(len);
        Ok(instance)
    }

    /// The AMI's root device name (for the root volume's size), cached per AMI. Concurrent
    /// callers for one AMI share one DescribeImages; an error answers the callers of that call
    /// and is not kept.
    async fn root_device_name(&self, image_id: &str) -> Result<String, Ec2Error> {
        let lookup = Arc::clone(
            self.root_devices
                .lock()
                .expect("root device lock")
                .entry(image_id.to_owned())
                .or_default(),
        );
        let result = lookup
            .get_or_init(|| self.describe_root_device(image_id))
            .await
            .clone();
        if result.is_err() {
            let mut lookups = self.root_devices.lock().expect("root device lock");
            if lookups
                .get(image_id)
                .is_some_and(|current| Arc::ptr_eq(current, &lookup))
            {
                lookups.remove(image_id);
            }
        }
        result
    }

    async fn describe_root_device(&self, image_id: &str) -> Result<String, Ec2Error> {
        let out = self
            .call("DescribeImages", Bucket::Describe, 1.0, None, || {
                self.client.describe_images().image_ids(image_id).send()
            })
            .await?;
        out.images()
            .first()
            .and_then(|i| i.root_device_name())
            .filter(|d| !d.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| Ec2Error::Rejected {
                action: "DescribeImages",
                code: "InvalidAMIID.NotFound".to_owned(),
                message: format!("The image id '[{image_id}]' does not exist"),
                request_id: None,
            })
    }

    /// Removes the operator's ownership tags (managed-by and UID) from an instance it keeps
    /// running or stopped after its Sandbox is deleted, so the orphan sweep never takes it for
    /// an orphan. The namespace, name and environment tags stay, as a record.
    pub(crate) async fn release(&self, id: &str) -> Result<(), Ec2Error> {
        use aws_sdk_ec2::types::Tag;
        self.call("DeleteTags", Bucket::Mutate, 1.0, Some(id), || {
            self.client
                .delete_tags()
                .resources(id)
                .tags(Tag::builder().key(super::TAG_MANAGED_BY).build())
                .tags(Tag::builder().key(super::TAG_UID).build())
                .send()
        })
        .await?;
        self.untrack(id);
        Ok(())
    }

    /// Every instance tagged as the operator's, from the next periodic refresh: it is asked to
    /// list them through the tag filter (one call it makes anyway), so the caller makes none of
    /// its own. Without a refresh loop, or when that refresh does not answer within
    /// [`MANAGED_LIST_PATIENCE`] past its due time (it failed), lists them itself.
    pub(crate) async fn list_managed_at_next_refresh(&self) -> Result<Vec<Instance>, Ec2Error> {
        let due = *self.next_refresh.lock().expect("next refresh lock");
        let asked = Instant::now();
        let Some(due) = due.filter(|d| d.saturating_duration_since(asked) <= MANAGED_LIST_MAX_WAIT)
        else {
            return self.list_managed().await;
        };
        let mut rx = self.managed_list.subscribe();
        self.want_managed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::from_std(due.max(asked) + MANAGED_LIST_PATIENCE);
        loop {
            if let Some((at, list)) = &*rx.borrow_and_update()
                && *at >= asked
            {
                return Ok(list.as_ref().clone());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => break,
            }
        }
        self.list_managed().await
    }

    /// Every instance tagged as the operator's, listed now (pages of 1,000).
    pub(crate) async fn list_managed(&self) -> Result<Vec<Instance>, Ec2Error> {
        let at = Instant::now();
        let found = self.describe_pages(vec![managed_filter()]).await?;
        for instance in &found {
            self.observe(&instance.id, Some(instance.clone()), at);
        }
        Ok(found)
    }

    /// Re-describes every tracked instance, by the route [`refresh_route`] picks: the
    /// operator's own through the managed-by tag (pages of 1,000) once there are more than 200
    /// of them or a list of managed instances was asked for
    /// ([`Core::list_managed_at_next_refresh`]), the rest by id (200 per filtered call, or 1,000
    /// per `InstanceIds` call); or, when that would take two calls or more and the region's
    /// instances fit in fewer pages, every instance in the region in pages of 1,000. A list of
    /// managed instances that was asked for is published either way.
    pub(crate) async fn refresh(&self) {
        // The flag first, then the time: a refresh that takes a request starts after it was
        // made, so the caller takes its list.
        let want = self
            .want_managed
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        let at = Instant::now();
        let targets = self.cache().refresh_targets(at);
        if targets.is_empty() && !want {
            return;
        }
        self.refreshing.send_replace(Some(at));
        let _under_way = RefreshUnderWay(&self.refreshing);
        let tagged = targets.iter().filter(|(_, managed)| *managed).count();
        let known_pages = self.region_pages.load(std::sync::atomic::Ordering::SeqCst);
        let route = refresh_route(
            tagged,
            targets.len() - tagged,
            want,
            self.ids_per_call(),
            self.page_size() as usize,
            (known_pages > 0).then_some(known_pages),
        );
        let mut rest: Vec<String> = targets.into_iter().map(|(id, _)| id).collect();
        let by_tag = match route {
            RefreshRoute::Region { give_up_after } => {
                match self.describe_region(give_up_after, &rest).await {
                    Ok((found, pages, complete)) => {
                        let mut seen = HashMap::with_capacity(rest.len());
                        let wanted: HashSet<&String> = rest.iter().collect();
                        let mut managed = Vec::new();
                        for instance in found {
                            if want && is_managed(&instance) {
                                managed.push(instance.clone());
                            }
                            if wanted.contains(&instance.id) {
                                seen.insert(instance.id.clone(), instance);
                            }
                        }
                        if complete {
                            self.region_pages
                                .store(pages, std::sync::atomic::Ordering::SeqCst);
                            if want {
                                self.managed_list
                                    .send_replace(Some((at, Arc::new(managed))));
                            }
                            // The whole region was listed: a tracked id it lacks is gone.
                            for id in rest {
                                let found = seen.remove(&id);
                                self.observe(&id, found, at);
                            }
                            return;
                        }
                        // More pages than the other route takes calls: remember, and finish
                        // by that route (once; the next refreshes go by it from the start).
                        debug!(
                            pages,
                            "the region holds more instances than a refresh lists by itself"
                        );
                        self.region_pages
                            .store(pages + 1, std::sync::atomic::Ordering::SeqCst);
                        rest.retain(|id| !seen.contains_key(id));
                        for (id, instance) in seen {
                            self.observe(&id, Some(instance), at);
                        }
                        lists_by_tag(tagged, want)
                    }
                    Err(err) => {
                        warn!(error = %err, "EC2 refresh of the region's instances failed; next try in one interval");
                        return;
                    }
                }
            }
            RefreshRoute::Split { by_tag } => by_tag,
        };
        // The managed list asked for is published once the refresh is over (its observations
        // are all in), so whoever asked sees the refresh's calls done.
        let mut managed = None;
        if by_tag {
            match self.describe_pages(vec![managed_filter()]).await {
                Ok(found) => {
                    if want {
                        managed = Some(found.clone());
                    }
                    let wanted: HashSet<&String> = rest.iter().collect();
                    let mut seen = HashSet::new();
                    for instance in found {
                        if wanted.contains(&instance.id) {
                            let id = instance.id.clone();
                            self.observe(&id, Some(instance), at);
                            seen.insert(id);
                        }
                    }
                    rest.retain(|id| !seen.contains(id));
                }
                Err(err) => {
                    warn!(error = %err, "EC2 refresh of managed instances failed; next try in one interval");
                    return;
                }
            }
        }
        if !rest.is_empty() {
            match self.describe_ids(&rest).await {
                Ok(mut outcome) => {
                    for id in rest {
                        if !outcome.rejected.contains_key(&id) {
                            let found = outcome.found.remove(&id);
                            self.observe(&id, found, at);
                        }
                    }
                }
                Err(err) => {
                    warn!(error = %err, "EC2 refresh failed; next try in one interval");
                }
            }
        }
        if let Some(list) = managed {
            self.managed_list.send_replace(Some((at, Arc::new(list))));
        }
    }

    /// Every instance in the region, unfiltered, in pages: the instances, the pages
    /// read and whether that was all of them. Stops with more to read once `give_up_after`
    /// pages are read (the other route is then no dearer).
    ///
    /// Spot requests are noted for the `tracked` ids and the managed instances only.
    async fn describe_region(
        &self,
        give_up_after: usize,
        tracked: &[String],
    ) -> Result<(Vec<Instance>, usize, bool), Ec2Error> {
        let tracked: HashSet<&str> = tracked.iter().map(String::as_str).collect();
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = self
                .call("DescribeInstances", Bucket::Describe, 1.0, None, || {
                    self.client
                        .describe_instances()
                        .max_results(self.page_size())
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
            pages += 1;
            out.extend(self.ingest_noting(page.reservations(), |i| {
                is_managed(i) || tracked.contains(i.id.as_str())
            }));
            match page.next_token() {
                Some(next) if !next.is_empty() => {
                    if pages >= give_up_after {
                        return Ok((out, pages, false));
                    }
                    token = Some(next.to_owned());
                }
                _ => return Ok((out, pages, true)),
            }
        }
    }
}

/// How a refresh asks EC2 for its tracked instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefreshRoute {
    /// By the managed-by tag (when `by_tag`), then by id for what the tag does not cover.
    Split { by_tag: bool },
    /// Every instance in the region in pages, given up (for the split) when more pages remain
    /// after `give_up_after`.
    Region { give_up_after: usize },
}

/// The route of a refresh of `tagged` instances carrying the managed-by tag (or not seen yet)
/// and `untagged` others (adopted by id), when the sweep `want`s the managed list, with
/// `ids_per_call` ids per `InstanceIds` call and the pages the region's instances took the last
/// time they were listed (`None`: not known; taken as one).
///
/// The split costs the tag's pages (when more than 200 carry it, or the list is wanted) plus
/// one call for up to 200 other ids, or one per `ids_per_call`. When that is two calls or more
/// and the region listing is known (or hoped) to take fewer pages, the region is listed, and
/// given up once it has read one page fewer than the split costs with more to come.
fn refresh_route(
    tagged: usize,
    untagged: usize,
    want: bool,
    ids_per_call: usize,
    page: usize,
    region_pages: Option<usize>,
) -> RefreshRoute {
    let page = page.max(1);
    let by_tag = lists_by_tag(tagged, want);
    let (tag_calls, by_id) = if by_tag {
        (tagged.div_ceil(page).max(1), untagged)
    } else {
        (0, tagged + untagged)
    };
    let id_calls = match by_id {
        0 => 0,
        n if n <= MAX_FILTER_VALUES => 1,
        n => n.div_ceil(ids_per_call.max(1)),
    };
    let split = tag_calls + id_calls;
    if split >= 2 && region_pages.unwrap_or(1) < split {
        RefreshRoute::Region {
            give_up_after: split - 1,
        }
    } else {
        RefreshRoute::Split { by_tag }
    }
}

/// Whether the split route lists through the managed-by tag: more than one filtered call's
/// worth of tagged instances, or the sweep wants the managed list.
fn lists_by_tag(tagged: usize, want: bool) -> bool {
    tagged > MAX_FILTER_VALUES || want
}

/// Whether `instance` carries the operator's managed-by tag.
fn is_managed(instance: &Instance) -> bool {
    instance.tags.get(TAG_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY_VALUE)
}

fn managed_filter() -> Filter {
    convert::filter(&format!("tag:{TAG_MANAGED_BY}"), [MANAGED_BY_VALUE])
}

/// Whether `a` was launched after `b` (ties: the larger id, so the choice is stable).
fn is_newer(a: &Instance, b: &Instance) -> bool {
    (a.launch_time, &a.id) > (b.launch_time, &b.id)
}

/// Errors of a merged call that may concern only some of its instances.
fn may_concern_some(err: &Ec2Error) -> bool {
    match err {
        Ec2Error::IncorrectState { .. } => true,
        Ec2Error::Rejected { code, .. } => {
            code.starts_with("InvalidInstanceID")
                || matches!(
                    code.as_str(),
                    "OperationNotPermitted"
                        | "UnsupportedOperation"
                        | "UnauthorizedOperation"
                        | "InsufficientInstanceCapacity"
                        | "IncorrectSpotRequestState"
                )
        }
        _ => false,
    }
}

/// Runs [`Core::refresh`] every `every` until `closed` closes.
pub(crate) async fn refresh_loop(core: Arc<Core>, every: Duration, mut closed: mpsc::Receiver<()>) {
    let every = every.max(Duration::from_millis(10));
    let first = tokio::time::Instant::now() + every;
    *core.next_refresh.lock().expect("next refresh lock") = Some(first.into_std());
    let mut ticks = tokio::time::interval_at(first, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = closed.recv() => return,
            tick = ticks.tick() => {
                *core.next_refresh.lock().expect("next refresh lock") = Some(tick.into_std() + every);
            }
        }
        tokio::select! {
            _ = closed.recv() => return,
            () = core.refresh() => {}
        }
    }
}

/// The stream behind `Ec2::changes`.
pub(crate) fn changes_stream(
    core: &Arc<Core>,
) -> impl futures::Stream<Item = String> + Send + Unpin + 'static {
    let rx = core.changes.subscribe();
    let weak = Arc::downgrade(core);
    Box::pin(futures::stream::unfold(
        (rx, weak, VecDeque::<String>::new()),
        |(mut rx, weak, mut backlog)| async move {
            loop {
                if let Some(id) = backlog.pop_front() {
                    return Some((id, (rx, weak, backlog)));
                }
                match rx.recv().await {
                    Ok(id) => return Some((id, (rx, weak, backlog))),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        warn!(
                            missed,
                            "a subscriber of EC2 changes fell behind; handing it every tracked instance"
                        );
                        if let Some(core) = weak.upgrade() {
                            let ids = core.cache().tracked_ids();
                            backlog.extend(ids);
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn inst(id: &str, secs: i64) -> Instance {
        Instance {
            id: id.to_owned(),
            state: InstanceState::Running,
            instance_type: None,
            private_ip: None,
            public_ip: None,
            private_dns: None,
            public_dns: None,
            availability_zone: None,
            launch_time: jiff::Timestamp::from_second(secs).ok(),
            spot: false,
            tags: BTreeMap::new(),
        }
    }

    fn offline_core() -> Arc<Core> {
        // A client that is never used to call anything.
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new("us-east-1"))
            .build();
        Arc::new(Core::new(
            aws_sdk_ec2::Client::from_conf(config),
            Ec2Settings::default(),
        ))
    }

    #[tokio::test]
    async fn a_lagging_subscriber_is_handed_every_tracked_id() {
        use futures::StreamExt;
        let core = offline_core();
        let mut stream = changes_stream(&core);
        let tracked = ["i-0000000a", "i-0000000b", "i-0000000c"];
        for id in tracked {
            core.track_and_lookup(id, Duration::ZERO);
        }
        for n in 0..super::super::CHANGES_CAPACITY + 10 {
            let _ = core.changes.send(format!("i-{n:08x}"));
        }
        let mut first: Vec<String> = Vec::new();
        for _ in 0..3 {
            first.push(stream.next().await.unwrap());
        }
        first.sort();
        assert_eq!(first, tracked);
        // Then what is still buffered, and the end when the layer is gone.
        assert!(stream.next().await.is_some());
        drop(core);
        let mut rest = 0;
        while stream.next().await.is_some() {
            rest += 1;
        }
        assert!(rest < super::super::CHANGES_CAPACITY);
    }

    #[tokio::test]
    async fn a_stale_lookup_waits_for_the_refresh_under_way_instead_of_calling() {
        let core = offline_core();
        let id = "i-0000000000000000a";
        let old = Instant::now() - Duration::from_secs(40);
        core.track_and_lookup(id, Duration::ZERO);
        core.observe(id, Some(inst(id, 1)), old);
        let max_age = Duration::from_secs(30);
        assert_eq!(core.track_and_lookup(id, max_age), None);
        // No refresh under way: nothing to wait for, the caller must ask EC2.
        assert_eq!(core.await_refresh(id, max_age).await, None);
        // A refresh started (it would stamp its observations with `started`).
        let started = Instant::now();
        let under_way = RefreshUnderWay(&core.refreshing);
        core.refreshing.send_replace(Some(started));
        let waiter = {
            let core = core.clone();
            tokio::spawn(async move { core.await_refresh(id, max_age).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the lookup waits for the refresh");
        core.observe(id, Some(inst(id, 2)), started);
        drop(under_way);
        let answer = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the lookup is answered once the refresh is over")
            .unwrap();
        assert_eq!(answer, Some(Some(inst(id, 2))));
        assert_eq!(*core.refreshing.borrow(), None);
        // An id the refresh does not cover (never observed) does not wait.
        let other = "i-0000000000000000b";
        core.track_and_lookup(other, Duration::ZERO);
        core.refreshing.send_replace(Some(Instant::now()));
        let quick = tokio::time::timeout(
            Duration::from_millis(500),
            core.await_refresh(other, max_age),
        )
        .await
        .expect("an id the refresh does not cover is not held");
        assert_eq!(quick, None);
    }

    #[tokio::test]
    async fn a_stale_lookup_just_before_the_refresh_tick_waits_for_that_refresh() {
        let core = offline_core();
        let id = "i-0000000000000000a";
        core.track_and_lookup(id, Duration::ZERO);
        core.observe(
            id,
            Some(inst(id, 1)),
            Instant::now() - Duration::from_secs(40),
        );
        let max_age = Duration::from_secs(30);
        // Due in 20 s: too far off to wait for.
        *core.next_refresh.lock().unwrap() = Some(Instant::now() + Duration::from_secs(20));
        assert_eq!(core.await_refresh(id, max_age).await, None);
        // The next refresh is due in 200 ms: the lookup waits for it to start and to end.
        *core.next_refresh.lock().unwrap() = Some(Instant::now() + Duration::from_millis(200));
        let waiter = {
            let core = core.clone();
            tokio::spawn(async move { core.await_refresh(id, max_age).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiter.is_finished(),
            "the lookup waits for the refresh due"
        );
        let started = Instant::now();
        let under_way = RefreshUnderWay(&core.refreshing);
        core.refreshing.send_replace(Some(started));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "the lookup waits for the refresh to end"
        );
        core.observe(id, Some(inst(id, 2)), started);
        drop(under_way);
        let answer = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("answered once the refresh is over")
            .unwrap();
        assert_eq!(answer, Some(Some(inst(id, 2))));
    }

    fn paced_core(run: crate::ec2::RateLimit, describe: crate::ec2::RateLimit) -> Arc<Core> {
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new("us-east-1"))
            .build();
        Arc::new(Core::new(
            aws_sdk_ec2::Client::from_conf(config),
            Ec2Settings {
                buckets: crate::ec2::RateLimits {
                    run,
                    describe,
                    max_wait: Duration::from_millis(200),
                    ..Default::default()
                },
                ..Default::default()
            },
        ))
    }

    #[tokio::test]
    async fn client_side_pacing_is_pacing_not_throttling() {
        use crate::ec2::RateLimit;
        let core = paced_core(RateLimit::new(1.0, 1.0), RateLimit::new(1.0, 0.01));
        // The bucket's one token goes; the next would wait 100 s: held back, nothing sent.
        core.pace("DescribeInstances", Bucket::Describe, 1.0)
            .await
            .unwrap();
        let err = core
            .pace("DescribeInstances", Bucket::Describe, 1.0)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Ec2Error::Paced { action: "DescribeInstances", wait } if wait > Duration::from_secs(90)),
            "{err:?}"
        );
        assert!(err.is_transient());
        assert_eq!(err.reason(), "ClientPaced");
        assert_eq!(err.code(), None, "no AWS code: AWS said nothing");
        let text = err.to_string();
        assert!(text.contains("client-side pacing"), "{text}");
        assert!(!text.contains("RequestLimitExceeded"), "{text}");
        assert!(!text.contains("throttled ("), "{text}");
        // Counted as pacing; no call counted at all, throttled or otherwise.
        assert_eq!(
            core.metrics.paced_counts().get("DescribeInstances/refused"),
            Some(&1)
        );
        assert!(
            core.metrics.counts().is_empty(),
            "{:?}",
            core.metrics.counts()
        );

        // AWS's throttling answer is throttling, worded as such.
        let aws = Failure {
            class: super::super::error::classify(Some("RequestLimitExceeded"), Some(503)),
            code: Some("RequestLimitExceeded".into()),
            message: "Request limit exceeded.".into(),
            request_id: None,
        }
        .into_error("DescribeInstances", None);
        assert_eq!(
            aws,
            Ec2Error::Throttled {
                action: "DescribeInstances"
            }
        );
        assert_eq!(aws.reason(), "EC2Throttled");
        assert!(aws.to_string().contains("throttled by AWS"), "{aws}");
        assert!(!aws.to_string().contains("client-side"), "{aws}");
    }

    #[tokio::test]
    async fn launches_take_turns_in_order_without_waiting() {
        use crate::ec2::RateLimit;
        // One launch at once, then one per 10 s.
        let core = paced_core(RateLimit::new(1.0, 0.1), RateLimit::UNLIMITED);
        let a = core.launch_turn("sandbox-a").unwrap();
        let b = core.launch_turn("sandbox-b").unwrap();
        let c = core.launch_turn("sandbox-c").unwrap();
        let now = Instant::now();
        assert!(a.due <= now + Duration::from_millis(50));
        assert!(b.due > now + Duration::from_secs(9) && c.due > b.due + Duration::from_secs(9));
        assert!(c.at > b.at);
        // Asking again finds the same turn: no second token.
        let again = core.launch_turn("sandbox-b").unwrap();
        assert_eq!((again.due, again.at), (b.due, b.at));
        assert_eq!(
            core.metrics.paced_counts().get("RunInstances/queued"),
            Some(&2)
        );
        // Beyond the line's bound (15 min of launches): refused, with how long until asking
        // again makes sense.
        let slow = paced_core(RateLimit::new(1.0, 0.001), RateLimit::UNLIMITED);
        slow.launch_turn("first").unwrap();
        match slow.launch_turn("second") {
            Err(Ec2Error::Paced {
                action: "RunInstances",
                wait,
            }) => {
                assert!(wait > Duration::from_secs(60), "{wait:?}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            slow.metrics.paced_counts().get("RunInstances/refused"),
            Some(&1)
        );
    }

    #[test]
    fn a_refresh_lists_the_region_only_where_that_takes_fewer_calls() {
        use RefreshRoute::{Region, Split};
        // Up to 200 launched instances: one call by id; more: the tag's pages.
        assert_eq!(
            refresh_route(150, 0, false, 1000, 1000, None),
            Split { by_tag: false }
        );
        assert_eq!(
            refresh_route(1000, 0, false, 1000, 1000, None),
            Split { by_tag: true }
        );
        // An adopted fleet (no managed-by tag): one call by id, or by InstanceIds.
        assert_eq!(
            refresh_route(0, 1000, false, 1000, 1000, None),
            Split { by_tag: false }
        );
        // A mixed fleet of up to 200: one filtered call by id.
        assert_eq!(
            refresh_route(100, 50, false, 1000, 1000, None),
            Split { by_tag: false }
        );
        // The sweep's list on an adopted fleet would cost the tag's page plus a call by id:
        // one page of the region (hoped for, or known) is cheaper.
        assert_eq!(
            refresh_route(0, 200, true, 1000, 1000, None),
            Region { give_up_after: 1 }
        );
        assert_eq!(
            refresh_route(0, 1000, true, 1000, 1000, Some(1)),
            Region { give_up_after: 1 }
        );
        // ... but not once the region is known to take two pages or more.
        assert_eq!(
            refresh_route(0, 1000, true, 1000, 1000, Some(2)),
            Split { by_tag: true }
        );
        // 500 launched and 10 adopted: the tag's page plus a call by id, or one region page.
        assert_eq!(
            refresh_route(500, 10, false, 1000, 1000, None),
            Region { give_up_after: 1 }
        );
        // 2,500 adopted in calls of 1,000 ids: three calls; a region of two pages is cheaper.
        assert_eq!(
            refresh_route(0, 2500, false, 1000, 1000, Some(2)),
            Region { give_up_after: 2 }
        );
        assert_eq!(
            refresh_route(0, 2500, false, 1000, 1000, Some(3)),
            Split { by_tag: false }
        );
        // Nothing tracked, the list wanted: the tag's one page.
        assert_eq!(
            refresh_route(0, 0, true, 1000, 1000, None),
            Split { by_tag: true }
        );
    }

    #[test]
    fn newest_by_launch_time_then_id() {
        assert!(is_newer(&inst("i-00000001", 20), &inst("i-00000002", 10)));
        assert!(!is_newer(&inst("i-00000001", 10), &inst("i-00000002", 10)));
        assert!(is_newer(&inst("i-00000002", 10), &inst("i-00000001", 10)));
    }

    #[test]
    fn which_merged_failures_are_told_apart() {
        let rejected = |code: &str| Ec2Error::Rejected {
            action: "StopInstances",
            code: code.to_owned(),
            message: String::new(),
            request_id: None,
        };
        assert!(may_concern_some(&rejected("InvalidInstanceID.NotFound")));
        assert!(may_concern_some(&rejected("UnauthorizedOperation")));
        assert!(!may_concern_some(&rejected("AuthFailure")));
        assert!(!may_concern_some(&Ec2Error::Throttled {
            action: "StopInstances"
        }));
        assert!(may_concern_some(&Ec2Error::IncorrectState {
            action: "StopInstances",
            instance_id: String::new(),
            message: String::new()
        }));
    }
}
