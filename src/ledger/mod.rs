//! The fleet ledger: an append-only history of what the operator did (EC2 actions, observed
//! instance states, deploy steps, secret syncs), a `sandboxes` table that mirrors the fleet with
//! the seeds' column names, power intervals per instance, and the reports built on them
//! (`sandbox-operator report cost|fleet|deploys`).
//!
//! SQLite (a file; the default) or PostgreSQL (a URL), one code path for both (see [`db`]),
//! migrations applied at start-up.
//!
//! Controllers record through a [`LedgerHandle`], which never waits for the database:
//!
//! ```no_run
//! # async fn demo() -> Result<(), sandbox_operator::ledger::LedgerError> {
//! use sandbox_operator::api::Market;
//! use sandbox_operator::ledger::*;
//! let ledger = LedgerHandle::spawn("sqlite:///var/lib/sandbox-operator/ledger.db", WriterOptions::default())?;
//! ledger.record(Ec2ActionEvent {
//!     at: jiff::Timestamp::now(),
//!     action: "StopInstances".into(),
//!     instance_id: Some("i-0123456789abcdef0".into()),
//!     sandbox: Some(NamespacedName::new("fleet", "w1")),
//!     outcome: Outcome::Succeeded,
//!     error_code: None,
//!     message: None,
//!     request_id: Some("5f6e...".into()),
//! });
//! ledger.record_power(
//!     PowerChange::new("i-0123456789abcdef0", "t3.large", Market::OnDemand, false, jiff::Timestamp::now())
//!         .sandbox("fleet", "w1")
//!         .reason(StopReason::Idle),
//! );
//! # Ok(()) }
//! ```

pub mod bench;
pub mod cost;
pub mod db;
pub mod deploys;
pub mod event;
pub mod report;
pub mod sandbox_row;
pub mod table;
pub mod writer;

use std::path::PathBuf;
use std::time::Duration;

use jiff::Timestamp;

pub use cost::{CostReport, PriceList};
pub use db::{Backend, EventQuery, LedgerUrl, StoredEvent};
pub use deploys::DeployHistory;
pub use event::{
    DeployStepEvent, Ec2ActionEvent, InstanceStateEvent, LedgerEvent, NamespacedName, Outcome,
    PowerChange, SecretSyncEvent, SecretTargetKind, StopReason,
};
pub use report::{ReportArgs, run_report};
pub use sandbox_row::SandboxRow;
pub use writer::{LedgerHandle, LedgerMetrics, WriterOptions};

use db::{OpenOptions, Pool};

/// What can go wrong with the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The `--ledger` value is neither a PostgreSQL URL nor a SQLite path.
    #[error("invalid ledger URL {url:?}: {reason}")]
    Url {
        /// The value given (a password in it is masked).
        url: String,
        /// Why it is neither.
        reason: String,
    },
    /// A report was asked of a SQLite ledger that does not exist.
    #[error(
        "no ledger at {0}: `sandbox-operator run` creates it; pass --ledger (or set SANDBOX_OPERATOR_LEDGER) to read another"
    )]
    Missing(PathBuf),
    /// Connecting failed.
    #[error("opening the ledger {url}: {source}")]
    Open {
        /// The ledger, its password masked.
        url: String,
        /// What the driver said.
        source: sqlx::Error,
    },
    /// Applying the migrations failed.
    #[error("applying the ledger's migrations to {url}: {source}")]
    Migrate {
        /// The ledger, its password masked.
        url: String,
        /// What the migrator said.
        source: sqlx::migrate::MigrateError,
    },
    /// A query failed.
    #[error("{what}: {source}")]
    Query {
        /// What was being done.
        what: &'static str,
        /// What the driver said.
        source: sqlx::Error,
    },
    /// A stored event's JSON did not parse (written by a newer version?).
    #[error("ledger event {id} has a payload this version cannot read: {source}")]
    Payload {
        /// The event's row id.
        id: i64,
        /// What the JSON parser said.
        source: serde_json::Error,
    },
    /// The price file could not be read.
    #[error("price file {path}: {reason}")]
    PriceFile {
        /// The price file.
        path: PathBuf,
        /// Why it could not be read.
        reason: String,
    },
    /// `--since`/`--until` did not parse.
    #[error(
        "invalid time {0:?}: expected a duration back from now (30d, 12h, 2w, 1d12h), an RFC 3339 time or a date (2024-05-01)"
    )]
    Since(String),
    /// An unknown `--environment`.
    #[error("invalid environment {0:?}: expected dev, staging or prod")]
    Environment(String),
    /// The writer task is gone.
    #[error("the ledger writer has stopped")]
    WriterGone,
    /// A flush did not finish in time (the database is down or slow).
    #[error("the ledger writer did not catch up within {0:?} (is the database down?)")]
    FlushTimeout(Duration),
    /// Encoding a report as JSON failed.
    #[error("encoding the report as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl LedgerError {
    fn query(what: &'static str) -> impl Fn(sqlx::Error) -> LedgerError {
        move |source| LedgerError::Query { what, source }
    }
}

/// A connected, migrated ledger: what the reports read, and what a writer can be started on.
#[derive(Clone, Debug)]
pub struct Ledger {
    pool: Pool,
    url: LedgerUrl,
}

impl Ledger {
    /// Connects to `url` (`sqlite:///path`, a path, or `postgres://...`), creating a missing
    /// SQLite file, and applies the migrations. Fails when the database is unreachable (see
    /// [`LedgerHandle::spawn`] for a writer that waits for it instead).
    pub async fn connect(url: &str) -> Result<Ledger, LedgerError> {
        Self::open(url, OpenOptions::default()).await
    }

    /// Like [`Self::connect`], but a missing SQLite file is an error rather than created: for
    /// reports.
    pub async fn connect_existing(url: &str) -> Result<Ledger, LedgerError> {
        Self::open(
            url,
            OpenOptions {
                create: false,
                ..OpenOptions::default()
            },
        )
        .await
    }

    async fn open(url: &str, options: OpenOptions) -> Result<Ledger, LedgerError> {
        let url = LedgerUrl::parse(url)?;
        let pool = Pool::open(&url, options).await?;
        if let Err(source) = pool.migrate().await {
            pool.close().await;
            return Err(LedgerError::Migrate {
                url: url.redacted(),
                source,
            });
        }
        Ok(Ledger { pool, url })
    }

    /// SQLite or PostgreSQL.
    pub fn backend(&self) -> Backend {
        self.pool.backend()
    }

    /// The URL, password hidden.
    pub fn url(&self) -> String {
        self.url.redacted()
    }

    /// Starts the writer on this ledger's pool.
    pub fn spawn_writer(&self, options: WriterOptions) -> LedgerHandle {
        writer::spawn(writer::Source::Ready(self.pool.clone()), options)
    }

    /// Stored events, oldest first.
    pub async fn events(&self, query: &EventQuery) -> Result<Vec<StoredEvent>, LedgerError> {
        self.pool.events(query).await
    }

    /// The `sandboxes` table, by namespace and name.
    pub async fn sandboxes(&self) -> Result<Vec<SandboxRow>, LedgerError> {
        self.pool.sandboxes().await
    }

    /// Cost per sandbox and in total over `[since, until)`, with the hours auto-stop saved.
    pub async fn cost_report(
        &self,
        since: Timestamp,
        until: Timestamp,
        prices: &PriceList,
    ) -> Result<CostReport, LedgerError> {
        let run = self.pool.run_time(since, until).await?;
        let gaps = self.pool.idle_gaps(since, until).await?;
        Ok(cost::build_report(since, until, prices, &run, &gaps))
    }

    /// Deploy history per environment, newest first, at most `limit` per environment.
    pub async fn deploy_history(
        &self,
        since: Option<Timestamp>,
        environment: Option<&str>,
        limit: usize,
    ) -> Result<DeployHistory, LedgerError> {
        let steps = self.pool.deploy_steps(since).await?;
        Ok(deploys::fold(&steps, since, environment, limit))
    }

    /// Closes the pool (a writer started on it stops writing).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
