//! `sandbox-operator report cost|fleet|deploys`: the ledger's reports, as tables or JSON.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use jiff::Timestamp;

use super::cost::{CostReport, PriceList, parse_since};
use super::deploys::DeployHistory;
use super::sandbox_row::SandboxRow;
use super::table::{Align, Table, or_dash};
use super::{Ledger, LedgerError};

/// The ledger the operator writes and the reports read unless told otherwise: a SQLite file in
/// the working directory.
pub const DEFAULT_LEDGER: &str = "sqlite://sandbox-operator-ledger.db";

/// The environment variable that names the ledger.
pub const LEDGER_ENV: &str = "SANDBOX_OPERATOR_LEDGER";

/// Table or JSON.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputFormat {
    /// Aligned columns, for people.
    #[default]
    Table,
    /// JSON, for programs.
    Json,
}

/// Where the ledger is and how to print.
#[derive(Args, Debug, Clone)]
pub struct LedgerArgs {
    /// The ledger: a SQLite file (sqlite:///path/ledger.db, or a plain path) or a PostgreSQL URL
    /// (postgres://user@host/db).
    #[arg(long, env = LEDGER_ENV, default_value = DEFAULT_LEDGER, value_name = "URL")]
    pub ledger: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// `sandbox-operator report ...`.
#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// Which report.
    #[command(subcommand)]
    pub report: Report,
}

/// The reports.
#[derive(Subcommand, Debug, Clone)]
pub enum Report {
    /// Cost per sandbox and in total from the power intervals, and the hours auto-stop saved.
    Cost(CostArgs),
    /// The sandboxes table: the fleet as the operator last saw it.
    Fleet(FleetArgs),
    /// Deploy history per environment, newest first.
    Deploys(DeploysArgs),
}

/// `report cost`.
#[derive(Args, Debug, Clone)]
pub struct CostArgs {
    /// The ledger to read.
    #[command(flatten)]
    pub common: LedgerArgs,
    /// The window's start: a duration back from now (30d, 12h, 2w), an RFC 3339 time or a date.
    #[arg(long, default_value = "30d")]
    pub since: String,
    /// The window's end (default: now), in the same forms.
    #[arg(long)]
    pub until: Option<String>,
    /// A YAML or JSON price file overriding the default list (the seeds' us-east-1 on-demand
    /// and spot prices): `prices: {t3.large: {on_demand: 0.0832, spot: 0.034}}`, optionally
    /// `currency: EUR` and `replace: true`.
    #[arg(long, value_name = "FILE")]
    pub prices: Option<PathBuf>,
}

/// `report fleet`.
#[derive(Args, Debug, Clone)]
pub struct FleetArgs {
    /// The ledger to read.
    #[command(flatten)]
    pub common: LedgerArgs,
    /// Only this environment (dev, staging, prod).
    #[arg(long)]
    pub environment: Option<String>,
}

/// `report deploys`.
#[derive(Args, Debug, Clone)]
pub struct DeploysArgs {
    /// The ledger to read.
    #[command(flatten)]
    pub common: LedgerArgs,
    /// Only deploy steps from this time on (default: all).
    #[arg(long)]
    pub since: Option<String>,
    /// Only this environment (dev, staging, prod).
    #[arg(long)]
    pub environment: Option<String>,
    /// At most this many deploys per environment.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
}

fn check_environment(env: &Option<String>) -> Result<(), LedgerError> {
    match env.as_deref() {
        None | Some("dev" | "staging" | "prod") => Ok(()),
        Some(other) => Err(LedgerError::Environment(other.to_string())),
    }
}

/// Runs a report and returns what to print.
pub async fn run_report(args: ReportArgs) -> Result<String, LedgerError> {
    run_report_at(args, Timestamp::now()).await
}

/// [`run_report`] with "now" given (for durations such as `--since 30d`).
pub async fn run_report_at(args: ReportArgs, now: Timestamp) -> Result<String, LedgerError> {
    match args.report {
        Report::Cost(a) => {
            let since = parse_since(&a.since, now)?;
            let until = match &a.until {
                Some(u) => parse_since(u, now)?,
                None => now,
            };
            let prices = match &a.prices {
                Some(path) => PriceList::from_file(path)?,
                None => PriceList::seeds(),
            };
            let ledger = Ledger::connect_existing(&a.common.ledger).await?;
            let report = ledger.cost_report(since, until, &prices).await;
            ledger.close().await;
            let report = report?;
            match a.common.output {
                OutputFormat::Json => json(&report),
                OutputFormat::Table => Ok(cost_table(&report)),
            }
        }
        Report::Fleet(a) => {
            check_environment(&a.environment)?;
            let ledger = Ledger::connect_existing(&a.common.ledger).await?;
            let rows = ledger.sandboxes().await;
            ledger.close().await;
            let rows: Vec<SandboxRow> = rows?
                .into_iter()
                .filter(|r| a.environment.as_ref().is_none_or(|e| *e == r.environment))
                .collect();
            match a.common.output {
                OutputFormat::Json => json(&rows),
                OutputFormat::Table => Ok(fleet_table(&rows)),
            }
        }
        Report::Deploys(a) => {
            check_environment(&a.environment)?;
            let since = a
                .since
                .as_deref()
                .map(|s| parse_since(s, now))
                .transpose()?;
            let ledger = Ledger::connect_existing(&a.common.ledger).await?;
            let history = ledger
                .deploy_history(since, a.environment.as_deref(), a.limit)
                .await;
            ledger.close().await;
            let history = history?;
            match a.common.output {
                OutputFormat::Json => json(&history),
                OutputFormat::Table => Ok(deploys_table(&history)),
            }
        }
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, LedgerError> {
    let mut s = serde_json::to_string_pretty(value)?;
    s.push('\n');
    Ok(s)
}

/// A time to the second, UTC.
pub fn fmt_time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn fmt_opt_time(t: Option<Timestamp>) -> String {
    t.map_or_else(|| "-".to_string(), fmt_time)
}

fn fmt_money(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"))
}

/// The cost report as a table.
pub fn cost_table(r: &CostReport) -> String {
    let mut out = format!(
        "Cost from {} to {} in {} (prices: {})\n\n",
        fmt_time(r.since),
        fmt_time(r.until),
        r.currency,
        r.prices
    );
    let mut t = Table::new(&[
        ("namespace", Align::Left),
        ("sandbox", Align::Left),
        ("instances", Align::Left),
        ("type", Align::Left),
        ("market", Align::Left),
        ("hours", Align::Right),
        ("price/h", Align::Right),
        ("cost", Align::Right),
        ("idle-stopped h", Align::Right),
        ("saved", Align::Right),
    ]);
    for s in &r.sandboxes {
        for line in &s.lines {
            t.row(vec![
                or_dash(Some(&s.namespace)),
                s.name.clone(),
                s.instances.join(","),
                or_dash(line.instance_type.as_deref()),
                line.market.clone(),
                format!("{:.2}", line.hours),
                fmt_money(line.price_per_hour),
                fmt_money(line.cost),
                format!("{:.2}", line.idle_stopped_hours),
                fmt_money(line.saved),
            ]);
        }
    }
    t.row(vec![
        "TOTAL".into(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        format!("{:.2}", r.total.hours),
        String::new(),
        fmt_money(Some(r.total.cost)),
        format!("{:.2}", r.total.idle_stopped_hours),
        fmt_money(Some(r.total.saved)),
    ]);
    out.push_str(&t.render());
    if !r.unpriced.is_empty() {
        out.push_str(&format!(
            "\nNo price for {}: their hours are counted, their cost is not (pass --prices FILE).\n",
            r.unpriced.join(", ")
        ));
    }
    out
}

/// The sandboxes table as a table.
pub fn fleet_table(rows: &[SandboxRow]) -> String {
    if rows.is_empty() {
        return "No sandboxes in the ledger.\n".to_string();
    }
    let mut t = Table::new(&[
        ("namespace", Align::Left),
        ("name", Align::Left),
        ("environment", Align::Left),
        ("status", Align::Left),
        ("health", Align::Left),
        ("ec2", Align::Left),
        ("instance", Align::Left),
        ("type", Align::Left),
        ("market", Align::Left),
        ("public ip", Align::Left),
        ("engine", Align::Left),
        ("load", Align::Right),
        ("image", Align::Left),
        ("auto-stop", Align::Left),
        ("updated", Align::Left),
    ]);
    for r in rows {
        t.row(vec![
            r.namespace.clone(),
            r.name.clone(),
            r.environment.clone(),
            r.status.clone(),
            r.health_status.clone(),
            or_dash(r.ec2_status.as_deref()),
            or_dash(r.instance_id.as_deref()),
            or_dash(r.instance_type.as_deref()),
            or_dash(r.market.as_deref()),
            or_dash(r.public_ip.as_deref()),
            r.browser_engine.clone(),
            format!("{}/{}", r.current_load, r.capacity),
            or_dash(r.gh_image_tag.as_deref()),
            if r.auto_stop_enabled {
                format!("{}m", r.idle_minutes_before_stop)
            } else {
                "off".to_string()
            },
            fmt_time(r.updated_at),
        ]);
    }
    t.render()
}

/// The deploy history as a table.
pub fn deploys_table(h: &DeployHistory) -> String {
    if h.environments.is_empty() {
        return "No deploys in the ledger.\n".to_string();
    }
    let mut t = Table::new(&[
        ("environment", Align::Left),
        ("namespace", Align::Left),
        ("deploy", Align::Left),
        ("tag", Align::Left),
        ("phase", Align::Left),
        ("targets", Align::Right),
        ("succeeded", Align::Right),
        ("failed", Align::Right),
        ("rolled back", Align::Right),
        ("started", Align::Left),
        ("finished", Align::Left),
    ]);
    for env in &h.environments {
        for d in &env.deploys {
            let name = match &d.deploy {
                Some(name) => name.clone(),
                None => format!(
                    "sandbox/{}",
                    d.sandboxes.first().map_or("-", |s| s.sandbox.as_str())
                ),
            };
            t.row(vec![
                env.environment.clone(),
                d.namespace.clone(),
                name,
                d.tag.clone(),
                d.phase.clone(),
                d.targets.to_string(),
                d.succeeded.to_string(),
                d.failed.to_string(),
                d.rolled_back.to_string(),
                fmt_time(d.started_at),
                fmt_opt_time(d.finished_at),
            ]);
        }
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::cost::{CostLine, CostTotal, SandboxCost};
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand, Debug)]
    enum Command {
        Report(ReportArgs),
    }

    #[test]
    fn parses_the_command_line() {
        let cli = Cli::try_parse_from([
            "x",
            "report",
            "cost",
            "--since",
            "7d",
            "--ledger",
            "postgres://h/db",
            "-o",
            "json",
            "--prices",
            "p.yaml",
        ])
        .unwrap();
        let Command::Report(ReportArgs {
            report: Report::Cost(c),
        }) = cli.command
        else {
            panic!("not cost")
        };
        assert_eq!(c.since, "7d");
        assert_eq!(c.common.ledger, "postgres://h/db");
        assert_eq!(c.common.output, OutputFormat::Json);
        assert_eq!(c.prices.as_deref(), Some(std::path::Path::new("p.yaml")));

        let cli = Cli::try_parse_from(["x", "report", "deploys", "--environment", "prod"]).unwrap();
        let Command::Report(ReportArgs {
            report: Report::Deploys(d),
        }) = cli.command
        else {
            panic!("not deploys")
        };
        assert_eq!(d.limit, 50);
        assert_eq!(d.common.output, OutputFormat::Table);
        assert!(Cli::try_parse_from(["x", "report", "fleet", "-o", "yaml"]).is_err());
    }

    #[test]
    fn renders_the_cost_table() {
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        let r = CostReport {
            since: t("2024-01-01T00:00:00Z"),
            until: t("2024-01-02T00:00:00Z"),
            currency: "USD".into(),
            prices: "default".into(),
            sandboxes: vec![SandboxCost {
                namespace: "ns".into(),
                name: "a".into(),
                instances: vec!["i-1".into()],
                lines: vec![CostLine {
                    instance_type: Some("t3.large".into()),
                    market: "on-demand".into(),
                    hours: 10.0,
                    price_per_hour: Some(0.0832),
                    cost: Some(0.832),
                    idle_stopped_hours: 5.0,
                    saved: Some(0.416),
                }],
                hours: 10.0,
                cost: 0.832,
                idle_stopped_hours: 5.0,
                saved: 0.416,
            }],
            total: CostTotal {
                hours: 10.0,
                cost: 0.832,
                idle_stopped_hours: 5.0,
                saved: 0.416,
            },
            unpriced: vec![],
        };
        let text = cost_table(&r);
        assert_eq!(
            text,
            "Cost from 2024-01-01T00:00:00Z to 2024-01-02T00:00:00Z in USD (prices: default)\n\
             \n\
             NAMESPACE   SANDBOX   INSTANCES   TYPE       MARKET      HOURS   PRICE/H     COST   IDLE-STOPPED H    SAVED\n\
             ns          a         i-1         t3.large   on-demand   10.00    0.0832   0.8320             5.00   0.4160\n\
             TOTAL                                                    10.00             0.8320             5.00   0.4160\n"
        );
    }

    #[test]
    fn empty_reports_say_so() {
        assert_eq!(fleet_table(&[]), "No sandboxes in the ledger.\n");
        let h = DeployHistory {
            since: None,
            environments: vec![],
        };
        assert_eq!(deploys_table(&h), "No deploys in the ledger.\n");
    }
}
