//! `kubectl-sandbox`: the kubectl plugin for the day-to-day actions the seeds' admin UI offered.
//! Put it in PATH and run it as `kubectl sandbox ...`.
//!
//!   kubectl sandbox start|stop NAME          set spec.powerState (Running | Stopped)
//!   kubectl sandbox wake NAME                start an auto-stopped sandbox without editing its
//!                                            spec (annotation fleet.valet.dev/start-requested-at)
//!   kubectl sandbox restart-adspower|probe|drain NAME
//!                                            day-2 actions (annotation fleet.valet.dev/action with
//!                                            a fresh fleet.valet.dev/action-id); waits for the
//!                                            result in status.lastAction unless --no-wait
//!   kubectl sandbox terminate NAME [--force] drain, then terminate the instance (--force:
//!                                            without draining); the Sandbox stays, phase
//!                                            Terminated, as its record
//!   kubectl sandbox approve|abort|retry DEPLOY
//!   kubectl sandbox tree                     the fleet: environments, sandboxes, health, image

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kube::api::{Api, ListParams, Patch, PatchParams};
use sandbox_operator::api::{
    ABORT_ANNOTATION, ACTION_ANNOTATION, ACTION_ID_ANNOTATION, RETRY_ANNOTATION,
    START_REQUESTED_ANNOTATION, Sandbox, SandboxDeploy, SecretBundle,
};

const MANAGER: &str = "kubectl-sandbox";

/// Day-to-day actions on sandboxes and deploys (fleet.valet.dev).
#[derive(Parser, Debug)]
#[command(name = "kubectl sandbox", version, about)]
struct Cli {
    /// The namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// `tree` across every namespace.
    #[arg(short = 'A', long, global = true)]
    all_namespaces: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Set spec.powerState to Running.
    Start { name: String },
    /// Set spec.powerState to Stopped.
    Stop { name: String },
    /// Ask a stopped (e.g. auto-stopped) sandbox to start, without changing its spec.
    Wake { name: String },
    /// Restart AdsPower on the sandbox (the agent's `adspower` service).
    RestartAdspower {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Probe the agent now and show its health.
    Probe {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Ask the worker to drain: it finishes its jobs and takes no new work.
    Drain {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Drain, wait for the active workers to finish, then terminate the instance (whatever
    /// deletionPolicy says); the Sandbox stays, in phase Terminated, as its record.
    Terminate {
        name: String,
        /// Do not drain: terminate at once.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Approve a SandboxDeploy that awaits approval (or continue a paused one): paused=false.
    Approve { deploy: String },
    /// Abort a SandboxDeploy: no new target starts; running ones finish.
    Abort { deploy: String },
    /// Retry the failed targets of a SandboxDeploy once.
    Retry { deploy: String },
    /// The fleet as a tree: environments, sandboxes with phase, health, image and instance, the
    /// deploys in flight and the secret bundles.
    Tree,
}

/// How a day-2 action waits for its result.
#[derive(clap::Args, Debug)]
struct WaitArgs {
    /// Return once the request is written, without waiting for the result.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for the result.
    #[arg(long, default_value = "2m", value_parser = parse_timeout)]
    timeout: std::time::Duration,
}

fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    sandbox_operator::util::parse_duration(s).map_err(|e| e.to_string())
}

/// Writes a day-2 request and (unless told not to) waits for its result in status.lastAction.
async fn day2(
    sbx: &Api<Sandbox>,
    pp: &PatchParams,
    name: &str,
    action: &str,
    wait: &WaitArgs,
) -> Result<String, Box<dyn std::error::Error>> {
    let id = jiff::Timestamp::now().to_string();
    sbx.patch(
        name,
        pp,
        &Patch::Merge(serde_json::json!({"metadata": {"annotations": {
            ACTION_ANNOTATION: action,
            ACTION_ID_ANNOTATION: id,
        }}})),
    )
    .await?;
    let asked = format!("sandbox/{name} {action} requested ({ACTION_ID_ANNOTATION}={id})\n");
    if wait.no_wait {
        return Ok(asked);
    }
    let deadline = std::time::Instant::now() + wait.timeout;
    loop {
        let last = match sbx.get_opt(name).await? {
            None => return Ok(format!("{asked}sandbox/{name} deleted\n")),
            Some(s) => s
                .status
                .and_then(|st| st.last_action)
                .filter(|a| a.request_id == id && a.name == action),
        };
        if let Some(a) = last {
            let line = format!(
                "{asked}sandbox/{name} {action}: {} ({}): {}\n",
                a.result,
                a.reason,
                a.message.unwrap_or_default()
            );
            match a.result.as_str() {
                "Succeeded" => return Ok(line),
                "Failed" | "Rejected" => return Err(line.trim_end().into()),
                _ => {}
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "{asked}sandbox/{name} {action}: no result within {:?}; see kubectl describe sandbox {name}",
                wait.timeout
            )
            .into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or_else(|_| jiff::Timestamp::now())
        .to_string()
}

async fn run(cli: Cli) -> Result<String, Box<dyn std::error::Error>> {
    let client = kube::Client::try_default().await?;
    let ns = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let sbx: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let deploys: Api<SandboxDeploy> = Api::namespaced(client.clone(), &ns);
    let merge = |v: serde_json::Value| Patch::Merge(v);
    let pp = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    };
    Ok(match cli.command {
        Cmd::Start { name } => {
            sbx.patch(
                &name,
                &pp,
                &merge(serde_json::json!({"spec": {"powerState": "Running"}})),
            )
            .await?;
            format!("sandbox/{name} powerState=Running\n")
        }
        Cmd::Stop { name } => {
            sbx.patch(
                &name,
                &pp,
                &merge(serde_json::json!({"spec": {"powerState": "Stopped"}})),
            )
            .await?;
            format!("sandbox/{name} powerState=Stopped\n")
        }
        Cmd::Wake { name } => {
            let t = now();
            sbx.patch(
                &name,
                &pp,
                &merge(serde_json::json!({"metadata": {"annotations": {START_REQUESTED_ANNOTATION: t}}})),
            )
            .await?;
            format!("sandbox/{name} woken ({START_REQUESTED_ANNOTATION}={t})\n")
        }
        Cmd::RestartAdspower { name, wait } => {
            day2(&sbx, &pp, &name, "restart-adspower", &wait).await?
        }
        Cmd::Probe { name, wait } => day2(&sbx, &pp, &name, "probe", &wait).await?,
        Cmd::Drain { name, wait } => day2(&sbx, &pp, &name, "drain", &wait).await?,
        Cmd::Terminate { name, force, wait } => {
            let action = if force {
                "terminate-force"
            } else {
                "terminate"
            };
            day2(&sbx, &pp, &name, action, &wait).await?
        }
        Cmd::Approve { deploy } => {
            deploys
                .patch(
                    &deploy,
                    &pp,
                    &merge(serde_json::json!({"spec": {"paused": false}})),
                )
                .await?;
            format!("sandboxdeploy/{deploy} approved\n")
        }
        Cmd::Abort { deploy } => {
            deploys
                .patch(
                    &deploy,
                    &pp,
                    &merge(serde_json::json!({"metadata": {"annotations": {ABORT_ANNOTATION: "true"}}})),
                )
                .await?;
            format!("sandboxdeploy/{deploy} aborted\n")
        }
        Cmd::Retry { deploy } => {
            let t = now();
            deploys
                .patch(
                    &deploy,
                    &pp,
                    &merge(serde_json::json!({"metadata": {"annotations": {RETRY_ANNOTATION: t}}})),
                )
                .await?;
            format!("sandboxdeploy/{deploy} retrying failed targets ({RETRY_ANNOTATION}={t})\n")
        }
        Cmd::Tree => {
            let (s, d, b): (Api<Sandbox>, Api<SandboxDeploy>, Api<SecretBundle>) =
                if cli.all_namespaces {
                    (
                        Api::all(client.clone()),
                        Api::all(client.clone()),
                        Api::all(client.clone()),
                    )
                } else {
                    (sbx, deploys, Api::namespaced(client.clone(), &ns))
                };
            let lp = ListParams::default();
            tree(
                s.list(&lp).await?.items,
                d.list(&lp).await?.items,
                b.list(&lp).await?.items,
            )
        }
    })
}

fn ready(conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> &str {
    conds
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| match c.status.as_str() {
            "True" => "Ready",
            "False" => "NotReady",
            _ => "Unknown",
        })
        .unwrap_or("Unknown")
}

/// The fleet as text: namespace, environment, then one line per sandbox.
fn tree(
    sandboxes: Vec<Sandbox>,
    deploys: Vec<SandboxDeploy>,
    bundles: Vec<SecretBundle>,
) -> String {
    use kube::ResourceExt;
    let mut by: BTreeMap<String, BTreeMap<String, Vec<Sandbox>>> = BTreeMap::new();
    for s in sandboxes {
        by.entry(s.namespace().unwrap_or_default())
            .or_default()
            .entry(s.spec.environment.to_string())
            .or_default()
            .push(s);
    }
    let mut namespaces: Vec<String> = by.keys().cloned().collect();
    for n in deploys
        .iter()
        .map(|d| d.namespace().unwrap_or_default())
        .chain(bundles.iter().map(|b| b.namespace().unwrap_or_default()))
    {
        if !namespaces.contains(&n) {
            namespaces.push(n);
        }
    }
    namespaces.sort();
    let mut out = String::new();
    for ns in namespaces {
        out.push_str(&format!("{ns}\n"));
        let envs = by.remove(&ns).unwrap_or_default();
        let mut sections: Vec<String> = Vec::new();
        for (env, mut list) in envs {
            list.sort_by_key(|s| s.name_any());
            let width = list.iter().map(|s| s.name_any().len()).max().unwrap_or(0);
            let mut sec = format!("{env} ({} sandboxes)\n", list.len());
            for (i, s) in list.iter().enumerate() {
                let st = s.status.clone().unwrap_or_default();
                let phase = st
                    .phase
                    .map(|p| format!("{p:?}"))
                    .unwrap_or_else(|| "-".into());
                let health = st
                    .agent
                    .as_ref()
                    .map(|a| format!("{:?}", a.health))
                    .unwrap_or_else(|| "-".into());
                let running = st
                    .agent
                    .as_ref()
                    .and_then(|a| a.image_tag.clone())
                    .unwrap_or_else(|| "-".into());
                let want = s.spec.image.as_ref().map(|i| i.tag.clone());
                let image = match want {
                    Some(w) if w != running => format!("{running} -> {w}"),
                    _ => running,
                };
                let inst = st
                    .instance
                    .as_ref()
                    .map(|i| {
                        format!(
                            "{} {}",
                            i.id,
                            i.state.map(|s| s.as_str()).unwrap_or_default()
                        )
                    })
                    .unwrap_or_else(|| "-".into());
                let stop = st
                    .stop_reason
                    .as_ref()
                    .map(|r| format!(" (stopped: {r})"))
                    .unwrap_or_default();
                let branch = if i + 1 == list.len() {
                    "└─"
                } else {
                    "├─"
                };
                sec.push_str(&format!(
                    "{branch} {:<width$}  {:<9} {:<8} {:<9} image {:<14} {inst}{stop}\n",
                    s.name_any(),
                    ready(&st.conditions),
                    phase,
                    health,
                    image,
                ));
            }
            sections.push(sec);
        }
        let active: Vec<String> = deploys
            .iter()
            .filter(|d| d.namespace().as_deref() == Some(ns.as_str()))
            .map(|d| {
                let st = d.status.clone().unwrap_or_default();
                format!(
                    "{} tag {} {} {}/{} updated{}",
                    d.name_any(),
                    d.spec.image.tag,
                    st.phase
                        .map(|p| format!("{p:?}"))
                        .unwrap_or_else(|| "Pending".into()),
                    st.updated,
                    st.total,
                    if st.failed > 0 {
                        format!(", {} failed", st.failed)
                    } else {
                        String::new()
                    }
                )
            })
            .collect();
        if !active.is_empty() {
            let mut sec = "deploys\n".to_string();
            for (i, l) in active.iter().enumerate() {
                let branch = if i + 1 == active.len() {
                    "└─"
                } else {
                    "├─"
                };
                sec.push_str(&format!("{branch} {l}\n"));
            }
            sections.push(sec);
        }
        let bs: Vec<String> = bundles
            .iter()
            .filter(|b| b.namespace().as_deref() == Some(ns.as_str()))
            .map(|b| {
                let st = b.status.clone().unwrap_or_default();
                format!(
                    "{} {} {}/{} targets synced, content {}",
                    b.name_any(),
                    ready(&st.conditions),
                    st.synced_targets,
                    st.total_targets,
                    st.content_hash
                        .as_deref()
                        .map(|h| &h[..h.len().min(12)])
                        .unwrap_or("-")
                )
            })
            .collect();
        if !bs.is_empty() {
            let mut sec = "secret bundles\n".to_string();
            for (i, l) in bs.iter().enumerate() {
                let branch = if i + 1 == bs.len() {
                    "└─"
                } else {
                    "├─"
                };
                sec.push_str(&format!("{branch} {l}\n"));
            }
            sections.push(sec);
        }
        for (i, sec) in sections.iter().enumerate() {
            let last = i + 1 == sections.len();
            for (j, line) in sec.lines().enumerate() {
                let prefix = match (j, last) {
                    (0, false) => "├─ ",
                    (0, true) => "└─ ",
                    (_, false) => "│  ",
                    (_, true) => "   ",
                };
                out.push_str(&format!("{prefix}{line}\n"));
            }
        }
    }
    if out.is_empty() {
        out.push_str("no sandboxes, deploys or secret bundles\n");
    }
    out
}

fn main() -> ExitCode {
    sandbox_operator::util::install_crypto_provider();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("starting the async runtime");
    match rt.block_on(run(cli)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kubectl sandbox: {e}");
            ExitCode::FAILURE
        }
    }
}
