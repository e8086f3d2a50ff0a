//! The writer: one task that owns the database writes, fed by a bounded queue, so that recording
//! never waits for the database.
//!
//! - Events go through a bounded `tokio::sync::mpsc` queue. [`LedgerHandle::record`] only
//!   `try_send`s: a reconcile never awaits the database. When the queue is full the event is
//!   lost, and counted: the `ledger_events_dropped` counter and a log line say how many.
//! - Sandbox rows do not use the queue: only the latest row of each Sandbox matters, so
//!   [`LedgerHandle::upsert_sandbox`] replaces the pending row in a map (bounded by the fleet's
//!   size) and wakes the writer. Nothing is lost, and rows that did not change since the writer
//!   last wrote them are not written again.
//! - The writer takes up to `batch_max` queued events at a time and writes them, with the pending
//!   sandbox rows, in one transaction. While the database is down it retries the same batch with
//!   backoff, taking nothing new: the queue is the buffer, and order is kept. Events carry a
//!   unique key, so a batch whose commit reached the database before the connection broke is not
//!   written twice.
//! - An entry the database refuses for good (a constraint, say) is isolated, logged and counted
//!   in `ledger_rejected`, and the rest of its batch is written.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, mpsc, oneshot};

use super::LedgerError;
use super::db::{KeyedEvent, LedgerUrl, OpenOptions, Pool, SandboxOp, Written, is_transient};
use super::event::{LedgerEvent, PowerChange};
use super::sandbox_row::SandboxRow;

/// How the writer queues and retries.
#[derive(Clone, Copy, Debug)]
pub struct WriterOptions {
    /// Events the queue holds while the database is slow or down; beyond that they are dropped
    /// (and counted).
    pub capacity: usize,
    /// Events written per transaction at most.
    pub batch_max: usize,
    /// The first retry's delay after a failed write.
    pub retry_min: Duration,
    /// The longest delay between retries.
    pub retry_max: Duration,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            batch_max: 512,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
        }
    }
}

/// The writer's metrics (register them with [`LedgerHandle::register_metrics`]).
#[derive(Clone, Debug, Default)]
pub struct LedgerMetrics {
    /// Events lost because the queue was full (or the writer had stopped).
    pub dropped: Counter,
    /// Events written.
    pub written: Counter,
    /// Entries the database refused for good (and that were therefore not written).
    pub rejected: Counter,
    /// Failed write attempts (each was retried).
    pub write_errors: Counter,
    /// Events waiting in the queue, as of the writer's last batch.
    pub queue_depth: Gauge,
}

// The large variant is the common one: boxing it would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Event(KeyedEvent),
    Flush(oneshot::Sender<()>),
}

type SandboxKey = (String, String);

struct Shared {
    capacity: usize,
    key_prefix: String,
    seq: AtomicU64,
    sandboxes: Mutex<BTreeMap<SandboxKey, SandboxOp>>,
    wake: Notify,
    metrics: LedgerMetrics,
    unreported_drops: AtomicU64,
    closed_logged: AtomicBool,
}

/// The handle the controllers record through. Cheap to clone; every method but
/// [`Self::flush`] and [`Self::record_wait`] returns at once, whatever the database is doing.
#[derive(Clone)]
pub struct LedgerHandle {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LedgerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerHandle")
            .field("capacity", &self.shared.capacity)
            .field("queued", &self.queued())
            .finish()
    }
}

/// Where the writer gets its pool: ready, or to be opened (and migrated) when it can.
pub(crate) enum Source {
    Ready(Pool),
    Lazy { url: LedgerUrl, open: OpenOptions },
}

fn key_prefix() -> String {
    static SPAWNED: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{:x}-{:x}-{:x}",
        nanos,
        std::process::id(),
        SPAWNED.fetch_add(1, Ordering::Relaxed)
    )
}

impl LedgerHandle {
    /// Starts a writer for the database at `url` (`sqlite:///path`, a path, or `postgres://...`)
    /// that connects and applies the migrations by itself, retrying while the database is down:
    /// start-up never waits for the database. Needs a tokio runtime.
    pub fn spawn(url: &str, options: WriterOptions) -> Result<LedgerHandle, LedgerError> {
        let url = LedgerUrl::parse(url)?;
        Ok(spawn(
            Source::Lazy {
                url,
                open: OpenOptions::default(),
            },
            options,
        ))
    }

    /// Records an event. Never waits: when the queue is full the event is dropped and counted.
    pub fn record(&self, event: impl Into<LedgerEvent>) {
        let msg = self.keyed(event.into());
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => self.lost(&msg, false),
            Err(mpsc::error::TrySendError::Closed(msg)) => self.lost(&msg, true),
        }
    }

    /// Records an event, waiting for room in the queue: for imports and benchmarks, never for a
    /// reconcile.
    pub async fn record_wait(&self, event: impl Into<LedgerEvent>) {
        let msg = self.keyed(event.into());
        if let Err(mpsc::error::SendError(msg)) = self.tx.send(msg).await {
            self.lost(&msg, true);
        }
    }

    /// Records a power change (an instance started or stopped): the cost report's input.
    pub fn record_power(&self, change: PowerChange) {
        self.record(change);
    }

    /// Sets a Sandbox's row in the `sandboxes` table (inserted or replaced). Never waits and
    /// never drops: a newer row for the same Sandbox replaces one not yet written.
    pub fn upsert_sandbox(&self, mut row: SandboxRow) {
        let r = crate::redact::process().current();
        if !r.is_empty()
            && let Some(f) = row.failure_reason.as_mut()
        {
            *f = r.redact(f);
        }
        let key = (row.namespace.clone(), row.name.clone());
        self.pending_sandbox(key, SandboxOp::Upsert(Box::new(row)));
    }

    /// Removes a Sandbox's row (its history stays in the events).
    pub fn delete_sandbox(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        self.pending_sandbox(
            key,
            SandboxOp::Delete {
                namespace: namespace.to_string(),
                name: name.to_string(),
            },
        );
    }

    /// Waits until everything recorded before the call is in the database (for shutdown and
    /// tests; this one does wait for the database).
    pub async fn flush(&self) -> Result<(), LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Flush(tx))
            .await
            .map_err(|_| LedgerError::WriterGone)?;
        rx.await.map_err(|_| LedgerError::WriterGone)
    }

    /// [`Self::flush`], giving up after `timeout`.
    pub async fn flush_within(&self, timeout: Duration) -> Result<(), LedgerError> {
        tokio::time::timeout(timeout, self.flush())
            .await
            .map_err(|_| LedgerError::FlushTimeout(timeout))?
    }

    /// Registers `ledger_events_dropped`, `ledger_events_written`, `ledger_rejected`,
    /// `ledger_write_errors` (counters) and `ledger_queue_depth` (gauge).
    pub fn register_metrics(&self, registry: &mut Registry) {
        let m = &self.shared.metrics;
        registry.register(
            "ledger_events_dropped",
            "Ledger events lost because the writer's queue was full",
            m.dropped.clone(),
        );
        registry.register(
            "ledger_events_written",
            "Ledger events written to the database",
            m.written.clone(),
        );
        registry.register(
            "ledger_rejected",
            "Ledger entries the database refused for good (not written)",
            m.rejected.clone(),
        );
        registry.register(
            "ledger_write_errors",
            "Failed ledger write attempts (retried with backoff)",
            m.write_errors.clone(),
        );
        registry.register(
            "ledger_queue_depth",
            "Ledger events waiting in the writer's queue",
            m.queue_depth.clone(),
        );
    }

    /// The metrics themselves.
    pub fn metrics(&self) -> &LedgerMetrics {
        &self.shared.metrics
    }

    /// Events lost so far.
    pub fn dropped(&self) -> u64 {
        self.shared.metrics.dropped.get()
    }

    /// Events waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.shared.capacity - self.tx.capacity()
    }

    fn keyed(&self, mut event: LedgerEvent) -> Msg {
        event.sanitize();
        mask_messages(&mut event, &crate::redact::process().current());
        let seq = self.shared.seq.fetch_add(1, Ordering::Relaxed);
        Msg::Event(KeyedEvent {
            // Zero-padded, so keys rise and the unique index grows at its right edge.
            key: format!("{}-{seq:016x}", self.shared.key_prefix),
            event,
        })
    }

    fn pending_sandbox(&self, key: SandboxKey, op: SandboxOp) {
        self.shared
            .sandboxes
            .lock()
            .expect("ledger sandbox map")
            .insert(key, op);
        self.shared.wake.notify_one();
    }

    fn lost(&self, msg: &Msg, closed: bool) {
        let Msg::Event(e) = msg else { return };
        let shared = &self.shared;
        shared.metrics.dropped.inc();
        if closed {
            if !shared.closed_logged.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    kind = e.event.kind(),
                    lost_total = shared.metrics.dropped.get(),
                    "the ledger writer has stopped: events are lost"
                );
            }
            return;
        }
        if shared.unreported_drops.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                capacity = shared.capacity,
                kind = e.event.kind(),
                "ledger queue full: dropping events until the writer catches up (it logs how many)"
            );
        }
    }
}

/// The last layer before the database: the free text of an event (its message) masked with
/// every secret the operator knows ([`crate::redact::process`]), whoever recorded it.
fn mask_messages(event: &mut LedgerEvent, r: &crate::redact::Redaction) {
    if r.is_empty() {
        return;
    }
    let message = match event {
        LedgerEvent::Ec2Action(e) => &mut e.message,
        LedgerEvent::DeployStep(e) => &mut e.message,
        LedgerEvent::SecretSync(e) => &mut e.message,
        LedgerEvent::InstanceState(_) => return,
    };
    if let Some(m) = message.as_mut() {
        *m = r.redact(m);
    }
}

pub(crate) fn spawn(source: Source, options: WriterOptions) -> LedgerHandle {
    let options = WriterOptions {
        capacity: options.capacity.max(1),
        batch_max: options.batch_max.max(1),
        ..options
    };
    let (tx, rx) = mpsc::channel(options.capacity);
    let shared = Arc::new(Shared {
        capacity: options.capacity,
        key_prefix: key_prefix(),
        seq: AtomicU64::new(0),
        sandboxes: Mutex::new(BTreeMap::new()),
        wake: Notify::new(),
        metrics: LedgerMetrics::default(),
        unreported_drops: AtomicU64::new(0),
        closed_logged: AtomicBool::new(false),
    });
    let writer = Writer {
        rx,
        source,
        options,
        shared: shared.clone(),
        written_rows: HashMap::new(),
        owns_pool: false,
    };
    tokio::spawn(writer.run());
    LedgerHandle { tx, shared }
}

struct Writer {
    rx: mpsc::Receiver<Msg>,
    source: Source,
    options: WriterOptions,
    shared: Arc<Shared>,
    /// The rows as last written, to skip upserts that change nothing.
    written_rows: HashMap<SandboxKey, SandboxRow>,
    /// Whether the writer opened the pool itself (and so closes it when done). A pool it was
    /// given belongs to the [`super::Ledger`] that gave it.
    owns_pool: bool,
}

/// Retry state for one batch.
struct Retry {
    attempt: u32,
    since: Instant,
    last_log: Option<Instant>,
}

impl Writer {
    async fn run(mut self) {
        let mut buf: Vec<Msg> = Vec::with_capacity(self.options.batch_max);
        let mut closed = false;
        loop {
            if !closed {
                tokio::select! {
                    biased;
                    n = self.rx.recv_many(&mut buf, self.options.batch_max) => closed = n == 0,
                    _ = self.shared.wake.notified() => {}
                }
            }
            let ops = self.take_sandbox_ops();
            if buf.is_empty() && ops.is_empty() {
                if closed {
                    break;
                }
                continue;
            }
            let mut events = Vec::with_capacity(buf.len());
            let mut flushes = Vec::new();
            for msg in buf.drain(..) {
                match msg {
                    Msg::Event(e) => events.push(e),
                    Msg::Flush(done) => flushes.push(done),
                }
            }
            let written = self.write(&events, &ops).await;
            self.shared.metrics.written.inc_by(written.events);
            for (key, op) in ops {
                match op {
                    SandboxOp::Upsert(row) => {
                        self.written_rows.insert(key, *row);
                    }
                    SandboxOp::Delete { .. } => {
                        self.written_rows.remove(&key);
                    }
                }
            }
            for done in flushes {
                let _ = done.send(());
            }
            self.shared.metrics.queue_depth.set(self.rx.len() as i64);
            self.report_drops();
        }
        if let (Source::Ready(pool), true) = (&self.source, self.owns_pool) {
            pool.close().await;
        }
    }

    /// The pending sandbox changes, minus upserts identical to what was last written.
    fn take_sandbox_ops(&mut self) -> Vec<(SandboxKey, SandboxOp)> {
        let pending =
            std::mem::take(&mut *self.shared.sandboxes.lock().expect("ledger sandbox map"));
        pending
            .into_iter()
            .filter(|(key, op)| match op {
                SandboxOp::Upsert(row) => !self
                    .written_rows
                    .get(key)
                    .is_some_and(|old| row.same_content(old)),
                SandboxOp::Delete { .. } => true,
            })
            .collect()
    }

    /// Writes a batch, retrying transient failures until they pass; entries refused for good
    /// are isolated, logged and counted.
    async fn write(&mut self, events: &[KeyedEvent], ops: &[(SandboxKey, SandboxOp)]) -> Written {
        let ops: Vec<SandboxOp> = ops.iter().map(|(_, op)| op.clone()).collect();
        match self.write_retrying(events, &ops).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    events = events.len(),
                    sandboxes = ops.len(),
                    "the ledger database refused a batch; writing its entries one by one"
                );
                let mut total = Written::default();
                for event in events {
                    match self.write_retrying(std::slice::from_ref(event), &[]).await {
                        Ok(w) => total.events += w.events,
                        Err(e) => {
                            self.shared.metrics.rejected.inc();
                            tracing::error!(
                                error = %e,
                                kind = event.event.kind(),
                                key = %event.key,
                                "the ledger database refused an event; it is not recorded"
                            );
                        }
                    }
                }
                for op in &ops {
                    match self.write_retrying(&[], std::slice::from_ref(op)).await {
                        Ok(w) => total.sandboxes += w.sandboxes,
                        Err(e) => {
                            self.shared.metrics.rejected.inc();
                            let (ns, name) = match op {
                                SandboxOp::Upsert(r) => (r.namespace.as_str(), r.name.as_str()),
                                SandboxOp::Delete { namespace, name } => {
                                    (namespace.as_str(), name.as_str())
                                }
                            };
                            tracing::error!(
                                error = %e,
                                namespace = ns,
                                name,
                                "the ledger database refused a sandboxes row"
                            );
                        }
                    }
                }
                total
            }
        }
    }

    /// Writes until it works (`Ok`) or the database refuses for good (`Err`).
    async fn write_retrying(
        &mut self,
        events: &[KeyedEvent],
        ops: &[SandboxOp],
    ) -> Result<Written, sqlx::Error> {
        let mut retry = Retry {
            attempt: 0,
            since: Instant::now(),
            last_log: None,
        };
        loop {
            let error = match self.pool().await {
                Ok(pool) => match pool.write_batch(events, ops).await {
                    Ok(w) => {
                        if retry.attempt > 0 {
                            tracing::info!(
                                after_s = retry.since.elapsed().as_secs_f64(),
                                attempts = retry.attempt + 1,
                                events = events.len(),
                                "the ledger database is back; the waiting events are written"
                            );
                        }
                        return Ok(w);
                    }
                    Err(e) if is_transient(&e) => e.to_string(),
                    Err(e) => return Err(e),
                },
                Err(e) => e.to_string(),
            };
            self.shared.metrics.write_errors.inc();
            let delay = backoff(
                retry.attempt,
                self.options.retry_min,
                self.options.retry_max,
            );
            let now = Instant::now();
            if retry
                .last_log
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(30))
            {
                retry.last_log = Some(now);
                tracing::warn!(
                    error = %error,
                    waiting = events.len() + self.rx.len(),
                    retry_in_ms = delay.as_millis() as u64,
                    down_for_s = retry.since.elapsed().as_secs_f64(),
                    "the ledger database is unavailable; events wait in the queue"
                );
            }
            self.report_drops();
            tokio::time::sleep(delay).await;
            retry.attempt = retry.attempt.saturating_add(1);
        }
    }

    /// The pool, opened and migrated first if need be.
    async fn pool(&mut self) -> Result<&Pool, LedgerError> {
        if let Source::Lazy { url, open } = &self.source {
            let pool = Pool::open(url, *open).await?;
            if let Err(source) = pool.migrate().await {
                pool.close().await;
                return Err(LedgerError::Migrate {
                    url: url.redacted(),
                    source,
                });
            }
            tracing::info!(ledger = %url.redacted(), "ledger database open, migrations applied");
            self.source = Source::Ready(pool);
            self.owns_pool = true;
        }
        match &self.source {
            Source::Ready(pool) => Ok(pool),
            Source::Lazy { .. } => unreachable!("opened above"),
        }
    }

    fn report_drops(&self) {
        let n = self.shared.unreported_drops.swap(0, Ordering::Relaxed);
        if n > 0 {
            tracing::warn!(
                lost = n,
                lost_total = self.shared.metrics.dropped.get(),
                capacity = self.shared.capacity,
                "ledger queue was full: {n} events lost"
            );
        }
    }
}

/// `min * 2^attempt`, at most `max`.
pub fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(attempt.min(20));
    min.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_masked_last() {
        use crate::ledger::{DeployStepEvent, Outcome};
        let secret = "pw\"with\\escapes$and-more";
        let r =
            crate::redact::Redaction::new(["DB_PASSWORD"], [secret, "pem-line-one\npem-line-two"]);
        let msg = format!(
            "pull failed: DB_PASSWORD={} pem-line-two",
            crate::agent::envfile::render_value(secret)
        );
        let mut e: LedgerEvent = DeployStepEvent {
            at: jiff::Timestamp::UNIX_EPOCH,
            namespace: "ns".into(),
            deploy: None,
            sandbox: Some("w1".into()),
            environment: None,
            tag: "v2".into(),
            previous_tag: None,
            step: "RolledBack".into(),
            outcome: Outcome::Failed,
            message: Some(msg),
        }
        .into();
        mask_messages(&mut e, &r);
        let LedgerEvent::DeployStep(d) = &e else {
            unreachable!()
        };
        let m = d.message.as_deref().unwrap();
        assert!(m.starts_with("pull failed: DB_PASSWORD="), "{m}");
        assert!(!m.contains("escapes") && !m.contains("pem-line-two"), "{m}");
        assert_eq!(d.tag, "v2");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(backoff(0, min, max), Duration::from_millis(100));
        assert_eq!(backoff(1, min, max), Duration::from_millis(200));
        assert_eq!(backoff(3, min, max), Duration::from_millis(800));
        assert_eq!(backoff(7, min, max), Duration::from_secs(10));
        assert_eq!(backoff(u32::MAX, min, max), Duration::from_secs(10));
    }
}
