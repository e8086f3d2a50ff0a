//! `sandbox-operator import`: Sandbox manifests for a fleet that already runs, from the old admin
//! API's `sandboxes` table (PostgreSQL) or from EC2 instances selected by tag.
//!
//! The edge is thin: read the source ([`source`]), read the Sandboxes already in the cluster,
//! hand both to [`plan::plan`] (pure), then print, write files, or apply with server-side apply.
//! Every record that cannot become a Sandbox is one `skip` line naming it and saying why; an
//! instance that already has a Sandbox is one `exists` line; nothing is written twice.

pub mod plan;
pub mod source;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use kube::api::{Api, ListParams, Patch, PatchParams};

use crate::api::{BrowserEngine, Environment, ManagementPolicy, Sandbox, SecretKeyRef};

use self::plan::{Existing, Options, Plan};

/// The field manager `--apply` writes with.
pub const FIELD_MANAGER: &str = "sandbox-operator-import";

/// Where the fleet is read from.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// The old admin API's `sandboxes` table in PostgreSQL (`--database-url` or `DATABASE_URL`).
    Database,
    /// EC2 instances selected by `--ec2-tag`.
    Ec2,
}

/// `sandbox-operator import` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ImportArgs {
    /// Where to read the fleet from: `database` (the seeds' `sandboxes` table) or `ec2`
    /// (instances selected by `--ec2-tag`).
    #[arg(long, value_enum)]
    pub from: SourceKind,

    /// PostgreSQL URL of the old admin database (postgres://user:password@host:port/db). Prefer
    /// the environment variable: a password on the command line is visible to other users.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The schema holding the table.
    #[arg(long, default_value = "public", value_name = "SCHEMA")]
    pub schema: String,
    /// The table (the seeds' `sandboxes`).
    #[arg(long, default_value = "sandboxes", value_name = "TABLE")]
    pub table: String,

    /// Select instances with this tag (repeatable; values of one key are alternatives, different
    /// keys must all match).
    #[arg(long = "ec2-tag", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub ec2_tags: Vec<(String, String)>,
    /// EC2 endpoint override.
    #[arg(long, env = "SANDBOX_OPERATOR_EC2_ENDPOINT")]
    pub ec2_endpoint: Option<String>,
    /// AWS region (the SDK's default chain when unset).
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,

    /// Import only this environment (dev, staging, prod). For EC2 instances without an
    /// Environment tag, also their environment.
    #[arg(long, value_parser = parse_environment_arg)]
    pub environment: Option<Environment>,
    /// The namespace of the Sandboxes (written into the manifests; the kubeconfig context's
    /// namespace for name checks and `--apply` when unset).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Full (the operator starts, stops and deploys as the spec says) or ObserveOnly (it only
    /// reads the instance and its agent).
    #[arg(long, default_value = "Full", value_parser = parse_management_policy)]
    pub management_policy: ManagementPolicy,
    /// A label for every imported Sandbox (repeatable), for example fleet.valet.dev/pool=workers
    /// so that SandboxDeploy and SecretBundle selectors find them.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// The agent token Secret for every imported Sandbox, NAME or NAME:KEY (key `token`).
    #[arg(long, value_name = "NAME[:KEY]", value_parser = parse_secret_ref)]
    pub agent_token_secret: Option<SecretKeyRef>,
    /// The browser engine where the source does not say (table default adspower, EC2 default
    /// chromium).
    #[arg(long, value_parser = parse_browser_engine_arg)]
    pub browser_engine: Option<BrowserEngine>,
    /// The capacity where the source does not say (default 5).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=256))]
    pub capacity: Option<i32>,
    /// Idle auto-stop after this long where the source does not say (EC2 instances; a table
    /// without the auto-stop columns), for example 30m.
    #[arg(long, value_name = "DURATION", value_parser = parse_idle_after)]
    pub auto_stop: Option<String>,

    /// Write one `<name>.yaml` per Sandbox into this directory instead of a multi-document
    /// stream on stdout.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Show what would be created, what exists already and what is skipped and why; write
    /// nothing.
    #[arg(long, conflicts_with = "apply")]
    pub dry_run: bool,
    /// Create the Sandboxes in the cluster with server-side apply (field manager
    /// sandbox-operator-import).
    #[arg(long)]
    pub apply: bool,
    /// Do not read the cluster: no check for instances that already have a Sandbox.
    #[arg(long, conflicts_with = "apply")]
    pub no_cluster: bool,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = parse_key_value(s)?;
    if !plan::is_label_key(&k) {
        return Err(format!("{k:?} is not a valid label key"));
    }
    if !plan::is_label_value(&v) {
        return Err(format!(
            "{v:?} is not a valid label value (at most 63 letters, digits, '-', '_', '.')"
        ));
    }
    if k == plan::IMPORTED_FROM_LABEL {
        return Err(format!("{k} is set by the import itself"));
    }
    Ok((k, v))
}

fn parse_environment_arg(s: &str) -> Result<Environment, String> {
    plan::parse_environment(s).ok_or_else(|| format!("{s:?} is not one of dev, staging, prod"))
}

fn parse_browser_engine_arg(s: &str) -> Result<BrowserEngine, String> {
    plan::parse_browser_engine(s).ok_or_else(|| format!("{s:?} is not one of chromium, adspower"))
}

fn parse_management_policy(s: &str) -> Result<ManagementPolicy, String> {
    match s {
        "Full" => Ok(ManagementPolicy::Full),
        "ObserveOnly" => Ok(ManagementPolicy::ObserveOnly),
        _ => Err(format!("{s:?} is not Full or ObserveOnly")),
    }
}

fn parse_secret_ref(s: &str) -> Result<SecretKeyRef, String> {
    let (name, key) = s.split_once(':').unwrap_or((s, "token"));
    if name.is_empty() || key.is_empty() || name.len() > 253 || key.len() > 253 {
        return Err(format!("{s:?} is not NAME or NAME:KEY"));
    }
    Ok(SecretKeyRef {
        name: name.to_owned(),
        key: key.to_owned(),
    })
}

fn parse_idle_after(s: &str) -> Result<String, String> {
    let d = crate::util::parse_duration(s).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_secs(60) {
        return Err(format!("{s:?} is shorter than 1m, auto-stop's minimum"));
    }
    Ok(s.trim().to_owned())
}

/// What can stop an import as a whole (a record that cannot be imported is a `skip` line, not
/// an error).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A flag is missing or contradicts another.
    #[error("{0}")]
    Usage(String),
    /// Reading the table.
    #[error(transparent)]
    Source(#[from] source::SourceError),
    /// No kubeconfig or in-cluster configuration.
    #[error(
        "no access to the cluster ({0}); pass --no-cluster to write manifests without checking for instances that already have a Sandbox"
    )]
    ClusterConfig(String),
    /// Listing the Sandboxes.
    #[error(
        "listing Sandboxes to find instances already adopted: {0} (pass --no-cluster to skip the check)"
    )]
    ListingSandboxes(String),
    /// Writing a manifest file.
    #[error("writing {path}: {source}")]
    WritingFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Rendering YAML.
    #[error("rendering a manifest: {0}")]
    Rendering(#[from] serde_yaml::Error),
    /// Writing to stdout or stderr.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

impl ImportArgs {
    fn options(&self) -> Options {
        Options {
            environment: self.environment,
            management_policy: self.management_policy,
            labels: self.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
            agent_token: self.agent_token_secret.clone(),
            browser_engine: self.browser_engine,
            capacity: self.capacity,
            auto_stop: self.auto_stop.clone(),
        }
    }
}

/// Runs the import. `Ok(false)` when a Sandbox could not be applied (each failure is reported).
pub async fn run(args: ImportArgs) -> Result<bool, ImportError> {
    let opts = args.options();
    match args.from {
        SourceKind::Database if args.database_url.is_none() => {
            return Err(ImportError::Usage(
                "--from database needs --database-url or DATABASE_URL".into(),
            ));
        }
        SourceKind::Ec2 if args.ec2_tags.is_empty() => {
            return Err(ImportError::Usage(
                "--from ec2 needs at least one --ec2-tag KEY=VALUE (the instances to import)"
                    .into(),
            ));
        }
        _ => {}
    }
    // The cluster next: without it (and without --no-cluster) there is no point reading.
    let client = if args.no_cluster {
        None
    } else {
        Some(
            kube::Client::try_default()
                .await
                .map_err(|e| ImportError::ClusterConfig(e.to_string()))?,
        )
    };
    let mapped: Vec<plan::Mapped> = match args.from {
        SourceKind::Database => {
            let url = args.database_url.as_deref().unwrap_or_default();
            let rows = source::read_table(url, &args.schema, &args.table).await?;
            rows.iter().map(|r| plan::map_row(r, &opts)).collect()
        }
        SourceKind::Ec2 => {
            let ec2 =
                crate::ec2::sdk_client(args.ec2_endpoint.as_deref(), args.region.as_deref()).await;
            let instances = source::read_ec2(&ec2, &args.ec2_tags).await?;
            instances
                .iter()
                .map(|i| plan::map_instance(i, &opts))
                .collect()
        }
    };

    let (existing, namespace) = match &client {
        None => (
            Vec::new(),
            args.namespace.clone().unwrap_or_else(|| "default".into()),
        ),
        Some(client) => {
            let ns = args
                .namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_owned());
            (cluster_sandboxes(client, &ns).await?, ns)
        }
    };
    let plan = plan::plan(mapped, &existing, &namespace, args.namespace.is_some());

    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    if args.dry_run {
        write!(stdout, "{}", plan::report(&plan, true))?;
        if let Some(dir) = &args.out_dir {
            writeln!(
                stdout,
                "dry run: nothing written to {} or the cluster",
                dir.display()
            )?;
        } else {
            writeln!(stdout, "dry run: nothing written")?;
        }
        return Ok(true);
    }
    write!(stderr, "{}", plan::report(&plan, false))?;
    if let Some(dir) = &args.out_dir {
        write_files(&plan, dir, &mut stderr)?;
    } else if !args.apply {
        write!(stdout, "{}", plan::manifests_yaml(&plan)?)?;
    }
    if args.apply {
        let client = client.expect("--apply conflicts with --no-cluster");
        return apply(&client, &plan, &namespace, &mut stderr).await;
    }
    Ok(true)
}

async fn cluster_sandboxes(
    client: &kube::Client,
    namespace: &str,
) -> Result<Vec<Existing>, ImportError> {
    let list = |api: Api<Sandbox>| async move { api.list(&ListParams::default()).await };
    let items = match list(Api::all(client.clone())).await {
        Ok(l) => l.items,
        // Without the right to list every namespace, the target namespace is what can be seen.
        Err(kube::Error::Api(s)) if s.code == 403 => {
            eprintln!(
                "note: not allowed to list Sandboxes in every namespace; checking namespace {namespace} only"
            );
            list(Api::namespaced(client.clone(), namespace))
                .await
                .map_err(|e| ImportError::ListingSandboxes(e.to_string()))?
                .items
        }
        Err(e) => return Err(ImportError::ListingSandboxes(e.to_string())),
    };
    Ok(items.iter().map(Existing::from_sandbox).collect())
}

fn write_files(
    plan: &Plan,
    dir: &std::path::Path,
    log: &mut impl Write,
) -> Result<(), ImportError> {
    let err = |path: PathBuf| move |source| ImportError::WritingFile { path, source };
    std::fs::create_dir_all(dir).map_err(err(dir.to_path_buf()))?;
    let mut n = 0;
    for m in plan.manifests() {
        let name = m.metadata.name.as_deref().unwrap_or("unnamed");
        let path = dir.join(format!("{name}.yaml"));
        let text = format!(
            "# Imported by sandbox-operator import from {}.\n{}",
            m.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(plan::IMPORT_SOURCE_ANNOTATION))
                .map(String::as_str)
                .unwrap_or("?"),
            plan::manifest_yaml(m)?
        );
        std::fs::write(&path, text).map_err(err(path.clone()))?;
        n += 1;
    }
    writeln!(log, "wrote {n} files to {}", dir.display())?;
    Ok(())
}

async fn apply(
    client: &kube::Client,
    plan: &Plan,
    default_ns: &str,
    log: &mut impl Write,
) -> Result<bool, ImportError> {
    let mut ok = true;
    for m in plan.manifests() {
        let ns = m.metadata.namespace.as_deref().unwrap_or(default_ns);
        let name = m.metadata.name.as_deref().unwrap_or_default();
        let mut body = plan::manifest_value(m)?;
        body["metadata"]["namespace"] = serde_json::Value::String(ns.to_owned());
        let api: Api<Sandbox> = Api::namespaced(client.clone(), ns);
        match api
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(&body),
            )
            .await
        {
            Ok(_) => writeln!(log, "applied {ns}/{name}")?,
            Err(e) => {
                ok = false;
                writeln!(log, "failed  {ns}/{name}: {e}")?;
            }
        }
    }
    Ok(ok)
}
