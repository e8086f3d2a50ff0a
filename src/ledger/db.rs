//! The database edge: one pool type over SQLite and PostgreSQL, the migrations, and every SQL
//! statement the ledger runs.
//!
//! One code path for both backends: every statement below is written once, in SQL both engines
//! accept (`$N` placeholders, `ON CONFLICT`, `CASE`, `CAST(... AS BIGINT)`, window functions), and
//! every function body is written once inside [`with_pool!`], which expands it for each concrete
//! pool type. Only the DDL differs (`migrations/sqlite`, `migrations/postgres`). sqlx's `Any`
//! driver would do the same at run time, but it is not among the crate's sqlx features and
//! decodes no timestamps; the macro keeps static types and costs nothing.

use std::collections::HashSet;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use jiff::Timestamp;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::types::chrono::{DateTime, Utc};

use super::LedgerError;
use super::event::{LedgerEvent, PowerEffect, StopReason, market_str};
use super::sandbox_row::SandboxRow;

static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("src/ledger/migrations/sqlite");
static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("src/ledger/migrations/postgres");

/// Which database a ledger URL names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LedgerUrl {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL.
    Postgres(String),
}

impl LedgerUrl {
    /// `postgres://...` or `postgresql://...`: PostgreSQL. `sqlite:///abs/path`,
    /// `sqlite://rel/path`, `sqlite:path` or a bare path: a SQLite file.
    pub fn parse(url: &str) -> Result<Self, LedgerError> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_string()));
        }
        let path = if let Some(rest) = url.strip_prefix("sqlite://") {
            rest
        } else if let Some(rest) = url.strip_prefix("sqlite:") {
            rest
        } else if url.contains("://") {
            return Err(LedgerError::Url {
                url: url.to_string(),
                reason: "expected postgres://..., sqlite:///path or a file path".into(),
            });
        } else {
            url
        };
        let path = path.split('?').next().unwrap_or_default();
        if path.is_empty() {
            return Err(LedgerError::Url {
                url: url.to_string(),
                reason: "no SQLite file path".into(),
            });
        }
        Ok(Self::Sqlite(PathBuf::from(path)))
    }

    /// The URL with any password hidden, for logs and errors.
    pub fn redacted(&self) -> String {
        match self {
            Self::Sqlite(p) => format!("sqlite://{}", p.display()),
            Self::Postgres(u) => redact_password(u),
        }
    }
}

fn redact_password(url: &str) -> String {
    // scheme://user:password@host/... -> scheme://user:***@host/...
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((auth, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// Which engine a ledger runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A connection pool on either backend.
#[derive(Clone, Debug)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Expands `$body` once per backend, with `$p` bound to the concrete pool.
macro_rules! with_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

/// How to open the database.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OpenOptions {
    /// Create a missing SQLite file (the operator does; a report does not).
    pub create: bool,
    /// Connections in the pool.
    pub max_connections: u32,
    /// How long to wait for a connection before giving up (and retrying, in the writer).
    pub acquire_timeout: Duration,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            create: true,
            max_connections: 4,
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

fn us(t: Timestamp) -> i64 {
    t.as_microsecond()
}

fn chrono(t: Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.as_microsecond()).unwrap_or_default()
}

fn jiff_ts(t: DateTime<Utc>) -> Timestamp {
    Timestamp::from_microsecond(t.timestamp_micros()).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn opt_chrono(t: Option<Timestamp>) -> Option<DateTime<Utc>> {
    t.map(chrono)
}

/// A timestamp column as a row reads it: both engines decode it as chrono's `DateTime<Utc>`,
/// the ledger's rows hold jiff's [`Timestamp`]. Named in `#[sqlx(try_from = "TimeColumn")]`
/// on a row's `Timestamp` fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeColumn(pub Timestamp);

/// A nullable timestamp column (see [`TimeColumn`]), for `Option<Timestamp>` fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptTimeColumn(pub Option<Timestamp>);

impl From<TimeColumn> for Timestamp {
    fn from(t: TimeColumn) -> Self {
        t.0
    }
}

impl From<OptTimeColumn> for Option<Timestamp> {
    fn from(t: OptTimeColumn) -> Self {
        t.0
    }
}

impl<DB: sqlx::Database> sqlx::Type<DB> for TimeColumn
where
    DateTime<Utc>: sqlx::Type<DB>,
{
    fn type_info() -> DB::TypeInfo {
        <DateTime<Utc> as sqlx::Type<DB>>::type_info()
    }

    fn compatible(ty: &DB::TypeInfo) -> bool {
        <DateTime<Utc> as sqlx::Type<DB>>::compatible(ty)
    }
}

impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for TimeColumn
where
    DateTime<Utc>: sqlx::Decode<'r, DB>,
{
    fn decode(value: DB::ValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        <DateTime<Utc> as sqlx::Decode<'r, DB>>::decode(value).map(|t| TimeColumn(jiff_ts(t)))
    }
}

impl<DB: sqlx::Database> sqlx::Type<DB> for OptTimeColumn
where
    DateTime<Utc>: sqlx::Type<DB>,
{
    fn type_info() -> DB::TypeInfo {
        <DateTime<Utc> as sqlx::Type<DB>>::type_info()
    }

    fn compatible(ty: &DB::TypeInfo) -> bool {
        <DateTime<Utc> as sqlx::Type<DB>>::compatible(ty)
    }
}

impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for OptTimeColumn
where
    DateTime<Utc>: sqlx::Decode<'r, DB>,
{
    fn decode(value: DB::ValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        <Option<DateTime<Utc>> as sqlx::Decode<'r, DB>>::decode(value)
            .map(|t| OptTimeColumn(t.map(jiff_ts)))
    }
}

impl Pool {
    /// Opens the pool. PostgreSQL connects lazily (so the writer can start while the server is
    /// down); SQLite opens the file.
    pub(crate) async fn open(url: &LedgerUrl, opts: OpenOptions) -> Result<Self, LedgerError> {
        match url {
            LedgerUrl::Sqlite(path) => {
                if !opts.create && !path.exists() {
                    return Err(LedgerError::Missing(path.clone()));
                }
                if opts.create
                    && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
                {
                    std::fs::create_dir_all(dir).map_err(|e| LedgerError::Open {
                        url: url.redacted(),
                        source: sqlx::Error::Io(e),
                    })?;
                }
                let connect = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(opts.create)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
                    // 8 MiB of page cache per connection (the default is 2 MiB): more of the
                    // event indexes stay in memory, within the operator's memory budget.
                    .pragma("cache_size", "-8192");
                let pool = SqlitePoolOptions::new()
                    .max_connections(opts.max_connections)
                    .acquire_timeout(opts.acquire_timeout)
                    .connect_with(connect)
                    .await
                    .map_err(|source| LedgerError::Open {
                        url: url.redacted(),
                        source,
                    })?;
                Ok(Pool::Sqlite(pool))
            }
            LedgerUrl::Postgres(u) => {
                let connect =
                    PgConnectOptions::from_str(u).map_err(|source| LedgerError::Open {
                        url: url.redacted(),
                        source,
                    })?;
                let pool = PgPoolOptions::new()
                    .max_connections(opts.max_connections)
                    .acquire_timeout(opts.acquire_timeout)
                    .connect_lazy_with(connect);
                Ok(Pool::Postgres(pool))
            }
        }
    }

    pub(crate) fn backend(&self) -> Backend {
        match self {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Applies the embedded migrations (idempotent).
    pub(crate) async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        match self {
            Pool::Sqlite(p) => SQLITE_MIGRATOR.run(p).await,
            Pool::Postgres(p) => POSTGRES_MIGRATOR.run(p).await,
        }
    }

    pub(crate) async fn close(&self) {
        with_pool!(self, p => p.close().await)
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Events per INSERT statement (20 parameters each: well under both engines' limits). Measured:
/// one row per statement is 2.5x slower on both; beyond 16 SQLite slows down again.
const EVENT_CHUNK: usize = 16;
const EVENT_PARAMS: usize = 20;

/// `INSERT INTO ledger_events ... VALUES (...), (...) ... ON CONFLICT DO NOTHING RETURNING
/// event_key` for `rows` rows: only placeholders vary, so the text is safe by construction.
fn insert_events_sql(rows: usize) -> String {
    static SQL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        (0..=EVENT_CHUNK)
            .map(|n| {
                let mut sql = String::from(
                    "INSERT INTO ledger_events (event_key, at, kind, namespace, sandbox, \
                     environment, instance_id, action, state, deploy, tag, step, bundle, \
                     target_kind, target_name, content_hash, request_id, outcome, message, \
                     payload) VALUES ",
                );
                for r in 0..n {
                    if r > 0 {
                        sql.push_str(", ");
                    }
                    sql.push('(');
                    for c in 0..EVENT_PARAMS {
                        if c > 0 {
                            sql.push_str(", ");
                        }
                        sql.push_str(&format!("${}", r * EVENT_PARAMS + c + 1));
                    }
                    sql.push(')');
                }
                sql.push_str(" ON CONFLICT (event_key) DO NOTHING RETURNING event_key");
                sql
            })
            .collect()
    });
    all[rows.min(EVENT_CHUNK)].clone()
}

const OPEN_INTERVAL: &str = "INSERT INTO power_intervals (instance_id, namespace, name, \
    instance_type, market, start_us, started_at) SELECT $1, $2, $3, $4, $5, $6, $7 WHERE NOT EXISTS \
    (SELECT 1 FROM power_intervals WHERE instance_id = $1 AND stop_us IS NULL)";

const CLOSE_INTERVAL: &str = "UPDATE power_intervals SET stop_us = CASE WHEN $1 < start_us THEN \
    start_us ELSE $1 END, stopped_at = $2, stop_reason = $3 WHERE instance_id = $4 AND stop_us IS NULL";

const TERMINATED_MARK: &str = "INSERT INTO power_intervals (instance_id, namespace, name, \
    instance_type, market, start_us, stop_us, started_at, stopped_at, stop_reason) VALUES ($1, $2, \
    $3, $4, $5, $6, $6, $7, $7, 'Terminated')";

const UPSERT_SANDBOX: &str = "INSERT INTO sandboxes (id, namespace, name, environment, instance_id, \
    instance_type, public_ip, private_ip, status, health_status, last_health_check_at, capacity, \
    current_load, ssh_key_name, novnc_url, browser_engine, ec2_status, last_started_at, \
    last_stopped_at, auto_stop_enabled, idle_minutes_before_stop, agent_version, \
    agent_last_seen_at, gh_image_tag, gh_image_updated_at, phase, market, stop_reason, \
    failure_reason, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
    $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, \
    $31) ON CONFLICT (namespace, name) DO UPDATE SET id = excluded.id, environment = \
    excluded.environment, instance_id = excluded.instance_id, instance_type = \
    excluded.instance_type, public_ip = excluded.public_ip, private_ip = excluded.private_ip, \
    status = excluded.status, health_status = excluded.health_status, last_health_check_at = \
    excluded.last_health_check_at, capacity = excluded.capacity, current_load = \
    excluded.current_load, ssh_key_name = excluded.ssh_key_name, novnc_url = excluded.novnc_url, \
    browser_engine = excluded.browser_engine, ec2_status = excluded.ec2_status, last_started_at = \
    excluded.last_started_at, last_stopped_at = excluded.last_stopped_at, auto_stop_enabled = \
    excluded.auto_stop_enabled, idle_minutes_before_stop = excluded.idle_minutes_before_stop, \
    agent_version = excluded.agent_version, agent_last_seen_at = excluded.agent_last_seen_at, \
    gh_image_tag = excluded.gh_image_tag, gh_image_updated_at = excluded.gh_image_updated_at, \
    phase = excluded.phase, market = excluded.market, stop_reason = excluded.stop_reason, \
    failure_reason = excluded.failure_reason, created_at = excluded.created_at, updated_at = \
    excluded.updated_at";

const DELETE_SANDBOX: &str = "DELETE FROM sandboxes WHERE namespace = $1 AND name = $2";

/// An event as queued: its idempotency key and the event.
#[derive(Clone, Debug)]
pub(crate) struct KeyedEvent {
    pub key: String,
    pub event: LedgerEvent,
}

/// A change to the `sandboxes` table.
#[derive(Clone, Debug)]
pub(crate) enum SandboxOp {
    Upsert(Box<SandboxRow>),
    Delete { namespace: String, name: String },
}

/// The indexed columns of an event row (the rest is in `payload`).
#[derive(Default)]
struct EventColumns {
    namespace: Option<String>,
    sandbox: Option<String>,
    environment: Option<String>,
    instance_id: Option<String>,
    action: Option<String>,
    state: Option<String>,
    deploy: Option<String>,
    tag: Option<String>,
    step: Option<String>,
    bundle: Option<String>,
    target_kind: Option<String>,
    target_name: Option<String>,
    content_hash: Option<String>,
    request_id: Option<String>,
    outcome: Option<String>,
    message: Option<String>,
}

fn columns(event: &LedgerEvent) -> EventColumns {
    match event {
        LedgerEvent::Ec2Action(e) => EventColumns {
            namespace: e.sandbox.as_ref().map(|s| s.namespace.clone()),
            sandbox: e.sandbox.as_ref().map(|s| s.name.clone()),
            instance_id: e.instance_id.clone(),
            action: Some(e.action.clone()),
            request_id: e.request_id.clone(),
            outcome: Some(e.outcome.as_str().to_string()),
            message: match (&e.error_code, &e.message) {
                (Some(c), Some(m)) => Some(format!("{c}: {m}")),
                (Some(c), None) => Some(c.clone()),
                (None, m) => m.clone(),
            },
            ..Default::default()
        },
        LedgerEvent::InstanceState(e) => EventColumns {
            namespace: e.sandbox.as_ref().map(|s| s.namespace.clone()),
            sandbox: e.sandbox.as_ref().map(|s| s.name.clone()),
            instance_id: Some(e.instance_id.clone()),
            state: Some(e.state.clone()),
            message: e.stop_reason.map(|r| r.as_str().to_string()),
            ..Default::default()
        },
        LedgerEvent::DeployStep(e) => EventColumns {
            namespace: Some(e.namespace.clone()),
            sandbox: e.sandbox.clone(),
            environment: e.environment.map(|v| v.as_str().to_string()),
            deploy: e.deploy.clone(),
            tag: Some(e.tag.clone()),
            step: Some(e.step.clone()),
            outcome: Some(e.outcome.as_str().to_string()),
            message: e.message.clone(),
            ..Default::default()
        },
        LedgerEvent::SecretSync(e) => EventColumns {
            namespace: Some(e.bundle.namespace.clone()),
            sandbox: (e.target_kind == super::event::SecretTargetKind::Sandbox)
                .then(|| e.target_name.clone()),
            bundle: Some(e.bundle.name.clone()),
            target_kind: Some(e.target_kind.as_str().to_string()),
            target_name: Some(e.target_name.clone()),
            content_hash: Some(e.content_hash.clone()),
            outcome: Some(e.outcome.as_str().to_string()),
            message: e.message.clone(),
            ..Default::default()
        },
    }
}

/// What one batch wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Written {
    /// Events inserted (duplicates of an earlier, committed attempt are not counted).
    pub events: u64,
    /// Sandbox rows upserted or deleted.
    pub sandboxes: u64,
}

impl Pool {
    /// Writes a batch in one transaction: the events (deriving power intervals from instance
    /// state events) and the sandbox row changes. Retrying a batch whose commit did reach the
    /// database writes nothing twice: events carry a unique key.
    pub(crate) async fn write_batch(
        &self,
        events: &[KeyedEvent],
        sandboxes: &[SandboxOp],
    ) -> Result<Written, sqlx::Error> {
        with_pool!(self, pool => {
            let mut written = Written::default();
            let mut tx = pool.begin().await?;
            for chunk in events.chunks(EVENT_CHUNK) {
                let mut insert =
                    sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(insert_events_sql(chunk.len())));
                for KeyedEvent { key, event } in chunk {
                    let c = columns(event);
                    let payload = serde_json::to_string(event)
                        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
                    insert = insert
                        .bind(key.as_str())
                        .bind(chrono(event.at()))
                        .bind(event.kind())
                        .bind(c.namespace)
                        .bind(c.sandbox)
                        .bind(c.environment)
                        .bind(c.instance_id)
                        .bind(c.action)
                        .bind(c.state)
                        .bind(c.deploy)
                        .bind(c.tag)
                        .bind(c.step)
                        .bind(c.bundle)
                        .bind(c.target_kind)
                        .bind(c.target_name)
                        .bind(c.content_hash)
                        .bind(c.request_id)
                        .bind(c.outcome)
                        .bind(c.message)
                        .bind(payload);
                }
                let inserted: HashSet<String> =
                    insert.fetch_all(&mut *tx).await?.into_iter().collect();
                written.events += inserted.len() as u64;
                for KeyedEvent { key, event } in chunk {
                    let LedgerEvent::InstanceState(s) = event else {
                        continue;
                    };
                    if !inserted.contains(key) {
                        continue; // written by an earlier attempt whose commit went through
                    }
                    let at = chrono(s.at);
                    let ns = s.sandbox.as_ref().map(|s| s.namespace.clone());
                    let name = s.sandbox.as_ref().map(|s| s.name.clone());
                    let market = market_str(s.market);
                    match s.power_effect() {
                        PowerEffect::Start => {
                            sqlx::query(OPEN_INTERVAL)
                                .bind(s.instance_id.as_str())
                                .bind(ns)
                                .bind(name)
                                .bind(s.instance_type.clone())
                                .bind(market)
                                .bind(us(s.at))
                                .bind(at)
                                .execute(&mut *tx)
                                .await?;
                        }
                        PowerEffect::Stop | PowerEffect::Terminate => {
                            let terminate = s.power_effect() == PowerEffect::Terminate;
                            let reason = if terminate {
                                Some(StopReason::Terminated)
                            } else {
                                s.stop_reason
                            };
                            let closed = sqlx::query(CLOSE_INTERVAL)
                                .bind(us(s.at))
                                .bind(at)
                                .bind(reason.map(|r| r.as_str()))
                                .bind(s.instance_id.as_str())
                                .execute(&mut *tx)
                                .await?
                                .rows_affected();
                            if closed == 0 && terminate {
                                sqlx::query(TERMINATED_MARK)
                                    .bind(s.instance_id.as_str())
                                    .bind(ns)
                                    .bind(name)
                                    .bind(s.instance_type.clone())
                                    .bind(market)
                                    .bind(us(s.at))
                                    .bind(at)
                                    .execute(&mut *tx)
                                    .await?;
                            }
                        }
                        PowerEffect::None => {}
                    }
                }
            }
            for op in sandboxes {
                match op {
                    SandboxOp::Upsert(r) => {
                        sqlx::query(UPSERT_SANDBOX)
                            .bind(r.id.as_str())
                            .bind(r.namespace.as_str())
                            .bind(r.name.as_str())
                            .bind(r.environment.as_str())
                            .bind(r.instance_id.clone())
                            .bind(r.instance_type.clone())
                            .bind(r.public_ip.clone())
                            .bind(r.private_ip.clone())
                            .bind(r.status.as_str())
                            .bind(r.health_status.as_str())
                            .bind(opt_chrono(r.last_health_check_at))
                            .bind(r.capacity)
                            .bind(r.current_load)
                            .bind(r.ssh_key_name.clone())
                            .bind(r.novnc_url.clone())
                            .bind(r.browser_engine.as_str())
                            .bind(r.ec2_status.clone())
                            .bind(opt_chrono(r.last_started_at))
                            .bind(opt_chrono(r.last_stopped_at))
                            .bind(r.auto_stop_enabled)
                            .bind(r.idle_minutes_before_stop)
                            .bind(r.agent_version.clone())
                            .bind(opt_chrono(r.agent_last_seen_at))
                            .bind(r.gh_image_tag.clone())
                            .bind(opt_chrono(r.gh_image_updated_at))
                            .bind(r.phase.clone())
                            .bind(r.market.clone())
                            .bind(r.stop_reason.clone())
                            .bind(r.failure_reason.clone())
                            .bind(chrono(r.created_at))
                            .bind(chrono(r.updated_at))
                            .execute(&mut *tx)
                            .await?;
                    }
                    SandboxOp::Delete { namespace, name } => {
                        sqlx::query(DELETE_SANDBOX)
                            .bind(namespace.as_str())
                            .bind(name.as_str())
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                written.sandboxes += 1;
            }
            tx.commit().await?;
            Ok(written)
        })
    }
}

/// Whether retrying could help: connection trouble, timeouts and server shutdowns yes; a
/// constraint violation or a malformed statement no (the writer then isolates the bad entry).
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            if !matches!(db.kind(), sqlx::error::ErrorKind::Other) {
                return false;
            }
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            // PostgreSQL SQLSTATE classes 22 (data exception) and 42 (syntax or access rule);
            // SQLite's SQLITE_ERROR (1), SQLITE_TOOBIG (18), SQLITE_CONSTRAINT (19) and
            // SQLITE_MISMATCH (20) and their extended codes.
            let permanent_pg =
                code.len() == 5 && (code.starts_with("22") || code.starts_with("42"));
            let sqlite_primary = code.parse::<i64>().ok().map(|c| c & 0xff);
            let permanent_sqlite = matches!(sqlite_primary, Some(1 | 18 | 19 | 20));
            !(permanent_pg || permanent_sqlite)
        }
        sqlx::Error::Encode(_)
        | sqlx::Error::InvalidArgument(_)
        | sqlx::Error::RowNotFound
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::Configuration(_) => false,
        _ => true,
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

/// An event as stored.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StoredEvent {
    /// The row id: the order in which the writer stored events (the order they were recorded).
    pub id: i64,
    /// The event.
    pub event: LedgerEvent,
}

/// Which events to read.
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    /// Only this kind (`ec2_action`, `instance_state`, `deploy_step`, `secret_sync`).
    pub kind: Option<String>,
    /// Only events at or after this time.
    pub since: Option<Timestamp>,
    /// Only events with a larger id.
    pub after_id: Option<i64>,
    /// At most this many (oldest first).
    pub limit: Option<i64>,
}

const SELECT_EVENTS: &str = "SELECT id, payload FROM ledger_events WHERE ($1 IS NULL OR kind = $1) \
    AND ($2 IS NULL OR at >= $2) AND id > $3 ORDER BY id LIMIT $4";

const SELECT_SANDBOXES: &str = "SELECT id, namespace, name, environment, instance_id, instance_type, \
    public_ip, private_ip, status, health_status, last_health_check_at, capacity, current_load, \
    ssh_key_name, novnc_url, browser_engine, ec2_status, last_started_at, last_stopped_at, \
    auto_stop_enabled, idle_minutes_before_stop, agent_version, agent_last_seen_at, gh_image_tag, \
    gh_image_updated_at, phase, market, stop_reason, failure_reason, created_at, updated_at FROM \
    sandboxes ORDER BY namespace, name";

/// Running time per sandbox, instance type and market within [$1, $2).
const RUN_TIME: &str = "SELECT namespace, name, instance_id, instance_type, market, \
    CAST(SUM((CASE WHEN stop_us IS NULL OR stop_us > $2 THEN $2 ELSE stop_us END) - \
    (CASE WHEN start_us < $1 THEN $1 ELSE start_us END)) AS BIGINT) AS run_us, \
    CAST(COUNT(*) AS BIGINT) AS intervals FROM power_intervals \
    WHERE start_us < $2 AND (stop_us IS NULL OR (stop_us > $1 AND stop_us > start_us)) \
    GROUP BY instance_id, namespace, name, instance_type, market";

/// Gaps after an auto-stop (reason Idle): from the stop to the instance's next start (or NULL:
/// not started again before $2), for gaps that reach into [$1, $2).
const IDLE_GAPS: &str = "SELECT namespace, name, instance_id, instance_type, market, stop_us, \
    next_start_us FROM (SELECT namespace, name, instance_id, instance_type, market, stop_us, \
    stop_reason, LEAD(start_us) OVER (PARTITION BY instance_id ORDER BY start_us, id) AS \
    next_start_us FROM power_intervals WHERE start_us < $2) g WHERE stop_reason = 'Idle' AND \
    stop_us < $2 AND (next_start_us IS NULL OR next_start_us > $1)";

/// Running time of one sandbox, instance type and market (from [`Pool::run_time`]).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct RunTime {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub instance_id: String,
    pub instance_type: Option<String>,
    pub market: String,
    pub run_us: i64,
    pub intervals: i64,
}

/// One idle gap (from [`Pool::idle_gaps`]).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct IdleGap {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub instance_id: String,
    pub instance_type: Option<String>,
    pub market: String,
    pub stop_us: i64,
    pub next_start_us: Option<i64>,
}

/// An event row as read back: its id and its JSON payload.
#[derive(sqlx::FromRow)]
struct PayloadRow {
    id: i64,
    payload: String,
}

impl PayloadRow {
    fn event(self) -> Result<StoredEvent, LedgerError> {
        let event = serde_json::from_str(&self.payload).map_err(|source| LedgerError::Payload {
            id: self.id,
            source,
        })?;
        Ok(StoredEvent { id: self.id, event })
    }
}

const DEPLOY_STEPS: &str = "SELECT id, payload FROM ledger_events WHERE kind = 'deploy_step' AND \
    ($1 IS NULL OR at >= $1) ORDER BY id";

impl Pool {
    pub(crate) async fn events(&self, q: &EventQuery) -> Result<Vec<StoredEvent>, LedgerError> {
        let since = opt_chrono(q.since);
        with_pool!(self, pool => {
            let rows: Vec<PayloadRow> = sqlx::query_as(SELECT_EVENTS)
                .bind(q.kind.clone())
                .bind(since)
                .bind(q.after_id.unwrap_or(0))
                .bind(q.limit.unwrap_or(i64::MAX))
                .fetch_all(pool)
                .await
                .map_err(LedgerError::query("reading events"))?;
            rows.into_iter().map(PayloadRow::event).collect()
        })
    }

    pub(crate) async fn deploy_steps(
        &self,
        since: Option<Timestamp>,
    ) -> Result<Vec<StoredEvent>, LedgerError> {
        with_pool!(self, pool => {
            let rows: Vec<PayloadRow> = sqlx::query_as(DEPLOY_STEPS)
                .bind(opt_chrono(since))
                .fetch_all(pool)
                .await
                .map_err(LedgerError::query("reading deploy steps"))?;
            rows.into_iter().map(PayloadRow::event).collect()
        })
    }

    pub(crate) async fn sandboxes(&self) -> Result<Vec<SandboxRow>, LedgerError> {
        let q = LedgerError::query("reading the sandboxes table");
        with_pool!(self, pool => {
            sqlx::query_as(SELECT_SANDBOXES).fetch_all(pool).await.map_err(&q)
        })
    }

    pub(crate) async fn run_time(
        &self,
        since: Timestamp,
        until: Timestamp,
    ) -> Result<Vec<RunTime>, LedgerError> {
        let q = LedgerError::query("summing power intervals");
        with_pool!(self, pool => {
            sqlx::query_as(RUN_TIME)
                .bind(us(since))
                .bind(us(until))
                .fetch_all(pool)
                .await
                .map_err(&q)
        })
    }

    pub(crate) async fn idle_gaps(
        &self,
        since: Timestamp,
        until: Timestamp,
    ) -> Result<Vec<IdleGap>, LedgerError> {
        let q = LedgerError::query("finding auto-stop gaps");
        with_pool!(self, pool => {
            sqlx::query_as(IDLE_GAPS)
                .bind(us(since))
                .bind(us(until))
                .fetch_all(pool)
                .await
                .map_err(&q)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ledger_urls() {
        assert_eq!(
            LedgerUrl::parse("sqlite:///var/lib/ledger.db").unwrap(),
            LedgerUrl::Sqlite("/var/lib/ledger.db".into())
        );
        assert_eq!(
            LedgerUrl::parse("sqlite://ledger.db?mode=rwc").unwrap(),
            LedgerUrl::Sqlite("ledger.db".into())
        );
        assert_eq!(
            LedgerUrl::parse("sqlite:x.db").unwrap(),
            LedgerUrl::Sqlite("x.db".into())
        );
        assert_eq!(
            LedgerUrl::parse("/tmp/l.db").unwrap(),
            LedgerUrl::Sqlite("/tmp/l.db".into())
        );
        assert!(matches!(
            LedgerUrl::parse("postgresql://u:p@h/db").unwrap(),
            LedgerUrl::Postgres(_)
        ));
        assert!(LedgerUrl::parse("mysql://h/db").is_err());
        assert!(LedgerUrl::parse("sqlite://").is_err());
    }

    #[test]
    fn hides_passwords() {
        let u = LedgerUrl::parse("postgres://ledger:s3cret@db:5432/ledger").unwrap();
        assert_eq!(u.redacted(), "postgres://ledger:***@db:5432/ledger");
        let u = LedgerUrl::parse("postgres://ledger@db/ledger").unwrap();
        assert_eq!(u.redacted(), "postgres://ledger@db/ledger");
    }
}
