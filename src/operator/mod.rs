//! The process: `sandbox-operator run`, the controllers, the HTTP server (`/healthz`, `/readyz`,
//! `/metrics`) and their wiring, with what belongs to the process rather than to one controller:
//! - [`webhook`]: the CI webhook and the operator's config file;
//! - [`leader`]: Lease-based leader election for more than one replica;
//! - [`notify`]: notifications (Slack-compatible and generic JSON webhooks) on rollouts, sick
//!   sandboxes and failed secret syncs, from a watcher task of its own.

pub mod leader;
pub mod notify;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tracing::info;

use crate::controller::sandbox::{self, ControllerSettings};
use crate::ec2::{Ec2, Ec2Settings};
use crate::metrics::Metrics;
use crate::util::parse_duration;

/// Settings of `sandbox-operator run`, from flags and environment variables.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// A YAML config file (the CI webhook's environments and secret, notification sinks; see
    /// README).
    #[arg(long, env = "SANDBOX_OPERATOR_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Address of the HTTP server for /healthz, /readyz, /metrics and the CI webhook.
    #[arg(
        long,
        env = "SANDBOX_OPERATOR_HTTP_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub http_addr: SocketAddr,
    /// Watch only this namespace (all namespaces when unset).
    #[arg(long, env = "SANDBOX_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// EC2 endpoint URL override (a local endpoint in tests; unset for real AWS).
    #[arg(long, env = "SANDBOX_OPERATOR_EC2_ENDPOINT")]
    pub ec2_endpoint: Option<String>,
    /// AWS region (the SDK's default chain when unset).
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// How often the shared EC2 view re-reads every tracked instance.
    #[arg(long, env = "SANDBOX_OPERATOR_EC2_REFRESH", default_value = "30s", value_parser = duration)]
    pub ec2_refresh: Duration,
    /// The operator's own client-side pacing of EC2 calls, as changes to its defaults:
    /// comma-separated NAME=CAPACITY/PER_SECOND for the describe, mutate and run buckets, and
    /// max-wait=DURATION (e.g. `run=9/4.5` for an account whose AWS limits were raised).
    #[arg(long, env = "SANDBOX_OPERATOR_EC2_BUCKETS", default_value = "")]
    pub ec2_buckets: String,
    /// How long concurrent EC2 requests are gathered into one call.
    #[arg(long, env = "SANDBOX_OPERATOR_EC2_BATCH_WINDOW", default_value = "100ms", value_parser = duration)]
    pub ec2_batch_window: Duration,
    /// How often each Sandbox is looked at when nothing changes.
    #[arg(long, env = "SANDBOX_OPERATOR_RESYNC", default_value = "5m", value_parser = duration)]
    pub resync: Duration,
    /// How often a Sandbox with something in flight (pending, stopping, deploying) is looked at.
    #[arg(long, env = "SANDBOX_OPERATOR_POLL", default_value = "2s", value_parser = duration)]
    pub poll: Duration,
    /// How long an image deploy, or a terminate request, waits for active workers to drain.
    #[arg(long, env = "SANDBOX_OPERATOR_DRAIN_TIMEOUT", default_value = "5m", value_parser = duration)]
    pub drain_timeout: Duration,
    /// How long one image deploy on one sandbox may take.
    #[arg(long, env = "SANDBOX_OPERATOR_DEPLOY_DEADLINE", default_value = "15m", value_parser = duration)]
    pub deploy_deadline: Duration,
    /// Image deploy to an old `health-server.js` (which reports no image tag and no deploy
    /// progress): how long after it accepted `POST /deploy` the box is left to run its deploy
    /// script before two consecutive healthy answers count as success. Shorter than
    /// --deploy-deadline.
    #[arg(long, env = "SANDBOX_OPERATOR_LEGACY_DEPLOY_SETTLE", default_value = "3m", value_parser = duration)]
    pub legacy_deploy_settle: Duration,
    /// Terminate instances the operator launched whose Sandbox has been gone this long
    /// ("off" only reports them).
    #[arg(long, env = "SANDBOX_OPERATOR_ORPHAN_GRACE", default_value = "10m")]
    pub orphan_grace: String,
    /// Finished SandboxDeploys kept per namespace; older ones are deleted.
    #[arg(long, env = "SANDBOX_OPERATOR_DEPLOY_HISTORY", default_value_t = 50)]
    pub deploy_history_limit: usize,
    /// How often a running SandboxDeploy is looked at when nothing wakes it (a change of any
    /// of its target Sandboxes wakes it at once).
    #[arg(long, env = "SANDBOX_OPERATOR_DEPLOY_POLL", default_value = "2s", value_parser = duration)]
    pub deploy_poll: Duration,
    /// How SecretBundles push to Fly.io apps whose spec names no method: `api` (Fly's Machines
    /// API, no CLI needed) or `flyctl`.
    #[arg(long, env = "SANDBOX_OPERATOR_FLY_METHOD", default_value = "api", value_parser = ["api", "flyctl"])]
    pub fly_method: String,
    /// The base URL of Fly's Machines API.
    #[arg(long, env = "SANDBOX_OPERATOR_FLY_API_URL", default_value = crate::controller::secretbundle::fly::api::DEFAULT_URL)]
    pub fly_api_url: String,
    /// The flyctl binary for Fly.io apps pushed with flyctl (a name in PATH, or a path).
    #[arg(long, env = "SANDBOX_OPERATOR_FLYCTL", default_value = "flyctl")]
    pub flyctl: std::path::PathBuf,
    /// Extra environment for flyctl, KEY=VALUE (repeatable); its environment is otherwise
    /// cleared but for PATH, HOME, TMPDIR, TLS and proxy settings and the app's token.
    #[arg(long = "flyctl-env", value_parser = key_value)]
    pub flyctl_env: Vec<(String, String)>,
    /// The fleet ledger: sqlite://PATH or postgres://... ("off" to keep none).
    #[arg(long, env = "SANDBOX_OPERATOR_LEDGER", default_value = crate::ledger::report::DEFAULT_LEDGER)]
    pub ledger: String,
    /// How often to look for orphaned instances.
    #[arg(long, env = "SANDBOX_OPERATOR_ORPHAN_SWEEP", default_value = "2m", value_parser = duration)]
    pub orphan_sweep: Duration,
    /// Reconciles each controller runs at once (the rest wait their turn, e.g. in the burst at
    /// start-up).
    #[arg(long, env = "SANDBOX_OPERATOR_MAX_CONCURRENT_RECONCILES", default_value_t = crate::controller::DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_reconciles: u16,
    /// Leader election (`--leader-elect`, `--lease-name`, `--lease-namespace`, ...).
    #[command(flatten)]
    pub leader: crate::operator::leader::LeaderArgs,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// What can stop `run` from starting.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No Kubernetes client configuration.
    #[error("connecting to Kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// A setting is wrong.
    #[error("invalid setting: {0}")]
    Setting(String),
    /// The HTTP server could not bind.
    #[error("binding the HTTP server to {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// Another replica took the leader lease, or it could not be renewed in time.
    #[error("lost the leader lease; stopping so that another replica takes over")]
    LeaseLost,
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

/// Runs the operator until SIGTERM or Ctrl-C.
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    if args.legacy_deploy_settle >= args.deploy_deadline {
        return Err(RunError::Setting(format!(
            "--legacy-deploy-settle ({}s) must be shorter than --deploy-deadline ({}s): a deploy to an old health server could never succeed",
            args.legacy_deploy_settle.as_secs(),
            args.deploy_deadline.as_secs()
        )));
    }
    let orphan_grace = match args.orphan_grace.as_str() {
        "off" | "never" => None,
        s => {
            Some(parse_duration(s).map_err(|e| RunError::Setting(format!("--orphan-grace: {e}")))?)
        }
    };
    let config: crate::operator::webhook::OperatorConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                RunError::Setting(format!("reading --config {}: {e}", path.display()))
            })?;
            let config: crate::operator::webhook::OperatorConfig = serde_yaml::from_str(&text)
                .map_err(|e| RunError::Setting(format!("--config {}: {e}", path.display())))?;
            // A selector the CRD would refuse is refused here, at start, not at each delivery.
            for (env, c) in config.webhook.iter().flat_map(|w| &w.environments) {
                let problems = c.selector.problems();
                if !problems.is_empty() {
                    return Err(RunError::Setting(format!(
                        "--config {}: webhook.environments.{env}.selector: {}",
                        path.display(),
                        problems.join("; ")
                    )));
                }
            }
            config
        }
        None => Default::default(),
    };
    // Notification sinks are checked at start too: a typo in an event name is an error now.
    let notify_settings = match &config.notifications {
        Some(n) => Some(n.check().map_err(|e| {
            RunError::Setting(match &args.config {
                Some(p) => format!("--config {}: {e}", p.display()),
                None => e,
            })
        })?),
        None => None,
    };
    let client = kube::Client::try_default().await?;
    crate::controller::refused::init(&client);
    let buckets = crate::ec2::RateLimits::default()
        .with_overrides(&args.ec2_buckets)
        .map_err(|e| RunError::Setting(format!("--ec2-buckets: {e}")))?;
    let sdk = crate::ec2::sdk_client(args.ec2_endpoint.as_deref(), args.region.as_deref()).await;
    let ec2 = Ec2::new(
        sdk,
        Ec2Settings {
            refresh_interval: args.ec2_refresh,
            batch_window: args.ec2_batch_window,
            buckets,
            ..Ec2Settings::default()
        },
    );
    let metrics = Arc::new(Metrics::new());
    metrics.register_with(|r| ec2.register_metrics(r));
    let ready = Arc::new(AtomicBool::new(false));

    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .map_err(|source| RunError::Bind {
            addr: args.http_addr,
            source,
        })?;
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(HttpState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        });
    // The CI webhook: every path under its prefix answers JSON, configured or not.
    let webhook = match config.webhook.clone() {
        Some(w) => Some(
            crate::operator::webhook::WebhookState::new(w, client.clone())
                .map_err(RunError::Setting)?,
        ),
        None => None,
    };
    app = app.merge(crate::operator::webhook::router(webhook));
    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "HTTP server listening");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http = {
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await;
        })
    };

    let settings = ControllerSettings {
        decide: crate::controller::sandbox::decide::Settings {
            drain_timeout: args.drain_timeout,
            deploy_deadline: args.deploy_deadline,
            legacy_settle: args.legacy_deploy_settle,
            resync: args.resync,
            poll: args.poll,
            ..Default::default()
        },
        orphan_grace,
        orphan_sweep_interval: args.orphan_sweep,
        ..ControllerSettings::default()
    };
    let ledger = match args.ledger.as_str() {
        "off" | "" => None,
        url => {
            let handle = crate::ledger::LedgerHandle::spawn(url, Default::default())
                .map_err(|e| RunError::Setting(format!("--ledger: {e}")))?;
            metrics.register_with(|r| handle.register_metrics(r));
            Some(handle)
        }
    };
    // One event recorder for the process, shared by the controllers.
    let recorder = crate::controller::recorder(client.clone(), &settings.reporter);
    let ctx = sandbox::Context::with_recorder(
        client.clone(),
        ec2,
        metrics.clone(),
        settings,
        ledger.clone(),
        recorder.clone(),
    );
    let shutdown = || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let deploy_ctx = crate::controller::deploy::Context::with_recorder(
        client.clone(),
        metrics.clone(),
        crate::controller::deploy::DeploySettings {
            history_limit: args.deploy_history_limit,
            poll: args.deploy_poll,
            ..Default::default()
        },
        recorder.clone(),
    );
    // With leader election, standbys are ready (they serve /metrics and the webhook) and start
    // the controllers only once they hold the Lease.
    let mut leadership = None;
    if args.leader.leader_elect {
        let s = args
            .leader
            .settings()
            .map_err(|e| RunError::Setting(e.to_string()))?;
        ready.store(true, Ordering::SeqCst);
        tokio::select! {
            l = crate::operator::leader::acquire(client.clone(), s) => leadership = Some(l),
            _ = shutdown_signal() => {
                let _ = stop_tx.send(true);
                let _ = http.await;
                return Ok(());
            }
        }
    }
    ready.store(true, Ordering::SeqCst);
    // Every secret the operator masks, known before the first reconcile.
    crate::controller::secretbundle::seed_redactor(
        &client,
        args.namespace.as_deref(),
        Duration::from_secs(30),
    )
    .await;
    info!("controllers starting");
    metrics.leader.set(1);
    let bundle_ctx = crate::controller::secretbundle::Context::with_recorder(
        client.clone(),
        metrics.clone(),
        crate::controller::secretbundle::ControllerSettings {
            flyctl: args.flyctl.clone(),
            flyctl_env: args.flyctl_env.clone(),
            fly_api: crate::controller::secretbundle::FlyApiSettings {
                url: args.fly_api_url.clone(),
                ..Default::default()
            },
            fly_api_default: args.fly_method == "api",
            ..Default::default()
        },
        recorder.clone(),
    );
    if let Some(ledger) = &ledger {
        bundle_ctx.set_ledger(ledger.clone());
        deploy_ctx.set_ledger(ledger.clone());
    }
    // The notifier watches on its own: no reconcile ever waits for a notification. (It keeps
    // its own Sandbox watch: it needs the watch's list boundaries, and caches only a small
    // observation per object.)
    let notifier = notify_settings.map(|n| {
        tokio::spawn(crate::operator::notify::run(
            client.clone(),
            args.namespace.clone(),
            n,
            metrics.clone(),
            shutdown(),
        ))
    });
    // One watch and one store of Sandboxes for the three controllers, each subscribed before
    // the watch starts.
    let sandboxes = crate::controller::sandboxes::SandboxWatch::new(
        client.clone(),
        args.namespace.as_deref(),
        crate::controller::sandboxes::DEFAULT_BUFFER,
    );
    let concurrency = args.max_concurrent_reconciles;
    let pool_ctx =
        crate::controller::pool::Context::with_recorder(client.clone(), metrics.clone(), recorder);
    let controllers = tokio::spawn(futures::future::join5(
        sandbox::run_shared(
            ctx,
            &sandboxes,
            args.namespace.clone(),
            concurrency,
            shutdown(),
        ),
        crate::controller::deploy::run_shared(
            deploy_ctx,
            &sandboxes,
            args.namespace.clone(),
            concurrency,
            shutdown(),
        ),
        crate::controller::secretbundle::run_shared(
            bundle_ctx,
            &sandboxes,
            args.namespace.clone(),
            concurrency,
            shutdown(),
        ),
        crate::controller::pool::run_shared(
            pool_ctx,
            &sandboxes,
            args.namespace.clone(),
            concurrency,
            shutdown(),
        ),
        sandboxes.run(shutdown()),
    ));
    let lost = async {
        match leadership.as_mut() {
            Some(l) => l.lost().await,
            None => std::future::pending().await,
        }
    };
    if tokio::select! { _ = shutdown_signal() => false, _ = lost => true } {
        // Stop acting at once: another replica may hold the lease already.
        controllers.abort();
        if let Some(n) = &notifier {
            n.abort();
        }
        metrics.leader.set(0);
        let _ = stop_tx.send(true);
        let _ = http.await;
        return Err(RunError::LeaseLost);
    }
    info!("shutting down");
    ready.store(false, Ordering::SeqCst);
    metrics.leader.set(0);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(20), controllers).await;
    if let Some(n) = notifier {
        let _ = tokio::time::timeout(Duration::from_secs(5), n).await;
    }
    if let Some(l) = leadership {
        l.release().await;
    }
    let _ = http.await;
    Ok(())
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics_text(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
