//! The pure part of `sandbox-operator import`: a row of the old `sandboxes` table, or an EC2
//! instance, becomes a Sandbox manifest (or a reason it cannot); the candidates are then checked
//! against each other and against the Sandboxes already in the cluster, and named. No I/O here:
//! the edge ([`super`]) reads the sources and the cluster and carries the plan out.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use jiff::Timestamp;
use kube::api::ObjectMeta;

use crate::api::{
    AgentSpec, AutoStopSpec, BrowserEngine, DeletionPolicy, Environment, ManagementPolicy,
    PowerState, Sandbox, SandboxSpec, SecretKeyRef,
};

/// Label on every imported Sandbox: where it came from, `database` or `ec2`.
pub const IMPORTED_FROM_LABEL: &str = "fleet.valet.dev/imported-from";
/// Annotation: the source record, `sandboxes/<row id>` or `ec2/<instance id>`.
pub const IMPORT_SOURCE_ANNOTATION: &str = "fleet.valet.dev/import-source";
/// Annotation: the name in the source, when the Sandbox's name had to differ from it.
pub const IMPORTED_NAME_ANNOTATION: &str = "fleet.valet.dev/imported-name";
/// Annotation: the source's tags that are not valid Kubernetes labels, as a JSON object.
pub const IMPORTED_TAGS_ANNOTATION: &str = "fleet.valet.dev/imported-tags";

/// The seeds' default capacity (`sandboxes.capacity DEFAULT 5`, the provision workflow's 5).
pub const SEED_DEFAULT_CAPACITY: i32 = 5;
/// The seeds' default idle time before auto-stop (`idle_minutes_before_stop DEFAULT 30`).
pub const SEED_DEFAULT_IDLE_MINUTES: i32 = 30;
/// The Sandbox API's capacity bounds.
const CAPACITY_RANGE: std::ops::RangeInclusive<i32> = 1..=256;

/// One row of the seeds' `sandboxes` table (migrations 0004, 0007 and 0009), every enum read as
/// text so that a value the API does not know is reported rather than failing the whole read.
/// A column the database lacks (a database migrated only part of the way) reads as NULL.
#[derive(Clone, Debug, Default, PartialEq, sqlx::FromRow)]
pub struct TableRow {
    /// The row's primary key (a uuid in the seeds), as text.
    pub id: String,
    /// `name`.
    pub name: Option<String>,
    /// `environment` (`sandbox_environment`: dev, staging, prod).
    pub environment: Option<String>,
    /// `instance_id`.
    pub instance_id: Option<String>,
    /// `instance_type`.
    pub instance_type: Option<String>,
    /// `status` (`sandbox_status`).
    pub status: Option<String>,
    /// `ec2_status` (`ec2_status`, migration 0009).
    pub ec2_status: Option<String>,
    /// `capacity`.
    pub capacity: Option<i32>,
    /// `browser_engine` (`browser_engine`, migration 0007).
    pub browser_engine: Option<String>,
    /// `auto_stop_enabled` (migration 0009).
    pub auto_stop_enabled: Option<bool>,
    /// `idle_minutes_before_stop` (migration 0009).
    pub idle_minutes_before_stop: Option<i32>,
    /// `tags` (jsonb), as JSON text.
    pub tags: Option<String>,
    /// `browser_config` (jsonb, migration 0007), as JSON text. Not carried: there is no field
    /// for it, and it may hold credentials.
    pub browser_config: Option<String>,
}

/// An EC2 instance as the import reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct Ec2Instance {
    /// `i-...`.
    pub id: String,
    /// EC2's state name: pending, running, stopping, stopped, shutting-down, terminated.
    pub state: String,
    /// `t3.large`, ...
    pub instance_type: Option<String>,
    /// When EC2 launched it (orders the instances: the older keeps a contested name).
    pub launch_time: Option<Timestamp>,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
}

/// What the command line adds to every source: defaults for what a source does not say, and
/// what every imported Sandbox gets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Options {
    /// Only this environment. For EC2 instances without an environment tag, also their
    /// environment.
    pub environment: Option<Environment>,
    /// Full (default) or ObserveOnly.
    pub management_policy: ManagementPolicy,
    /// Labels every imported Sandbox carries.
    pub labels: BTreeMap<String, String>,
    /// The agent token Secret for every imported Sandbox.
    pub agent_token: Option<SecretKeyRef>,
    /// The browser engine where the source does not say (else adspower for the table, the
    /// seeds' column default, and chromium, the API's default, for EC2).
    pub browser_engine: Option<BrowserEngine>,
    /// The capacity where the source does not say (else 5, the seeds' default).
    pub capacity: Option<i32>,
    /// Auto-stop after this idle time where the source does not say (EC2 instances, and a
    /// table without the 0009 columns).
    pub auto_stop: Option<String>,
}

/// Where a candidate came from, for the report and the annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceRef {
    /// A row of the `sandboxes` table.
    Row {
        /// Its id.
        id: String,
        /// Its name column.
        name: Option<String>,
    },
    /// An EC2 instance.
    Instance {
        /// Its id.
        id: String,
        /// Its `Name` tag.
        name: Option<String>,
    },
}

impl SourceRef {
    /// `database` or `ec2`: the value of [`IMPORTED_FROM_LABEL`].
    pub fn kind(&self) -> &'static str {
        match self {
            SourceRef::Row { .. } => "database",
            SourceRef::Instance { .. } => "ec2",
        }
    }

    /// The value of [`IMPORT_SOURCE_ANNOTATION`].
    pub fn annotation(&self) -> String {
        match self {
            SourceRef::Row { id, .. } => format!("sandboxes/{id}"),
            SourceRef::Instance { id, .. } => format!("ec2/{id}"),
        }
    }

    fn source_name(&self) -> Option<&str> {
        match self {
            SourceRef::Row { name, .. } | SourceRef::Instance { name, .. } => name.as_deref(),
        }
    }
}

impl std::fmt::Display for SourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, id, name) = match self {
            SourceRef::Row { id, name } => ("row", id, name),
            SourceRef::Instance { id, name } => ("instance", id, name),
        };
        write!(f, "{what} {id}")?;
        if let Some(n) = name {
            write!(f, " ({n:?})")?;
        }
        Ok(())
    }
}

/// A source record the API can express: everything the manifest needs but its final name.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Where it came from.
    pub source: SourceRef,
    /// The preferred name: the source's name made a DNS-1123 label, else the instance id.
    pub base_name: String,
    /// The instance to adopt.
    pub instance_id: String,
    /// The spec.
    pub spec: SandboxSpec,
    /// Labels (the source's tags that are valid labels, the command line's, the import label).
    pub labels: BTreeMap<String, String>,
    /// Annotations (the source record, and what could not be a label).
    pub annotations: BTreeMap<String, String>,
    /// What was not carried over, for the report.
    pub notes: Vec<String>,
}

/// What mapping one source record gave.
#[derive(Clone, Debug, PartialEq)]
pub enum Mapped {
    /// A Sandbox can be made of it.
    Candidate(Box<Candidate>),
    /// It cannot, and why (one line in the report).
    Skip {
        /// The record.
        source: SourceRef,
        /// Why.
        reason: String,
    },
    /// Of another environment than the one asked for: counted, not listed.
    NotSelected,
}

fn skip(source: &SourceRef, reason: impl Into<String>) -> Mapped {
    Mapped::Skip {
        source: source.clone(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Values

/// Whether `s` is an EC2 instance id as the Sandbox API accepts it.
pub fn is_instance_id(s: &str) -> bool {
    let Some(hex) = s.strip_prefix("i-") else {
        return false;
    };
    (hex.len() == 8 || hex.len() == 17)
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `s` is an instance type as the Sandbox API accepts it (`t3.large`).
pub fn is_instance_type(s: &str) -> bool {
    let ok = |part: &str, dash: bool| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || (dash && b == b'-'))
    };
    s.len() <= 64
        && s.split_once('.')
            .is_some_and(|(family, size)| ok(family, true) && ok(size, false))
}

/// The environment for one of the seeds' values (`dev`, `staging`, `prod`).
pub fn parse_environment(s: &str) -> Option<Environment> {
    match s {
        "dev" => Some(Environment::Dev),
        "staging" => Some(Environment::Staging),
        "prod" => Some(Environment::Prod),
        _ => None,
    }
}

/// The browser engine for one of the seeds' values (`chromium`, `adspower`).
pub fn parse_browser_engine(s: &str) -> Option<BrowserEngine> {
    match s {
        "chromium" => Some(BrowserEngine::Chromium),
        "adspower" => Some(BrowserEngine::Adspower),
        _ => None,
    }
}

/// `s` made a DNS-1123 label: lower case, runs of anything else than letters and digits become
/// one `-`, no `-` at either end, at most 63 characters. None when nothing is left.
pub fn dns_label(s: &str) -> Option<String> {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.truncate(63);
    let out = out.trim_end_matches('-').to_owned();
    (!out.is_empty()).then_some(out)
}

/// `base` with the instance id's hex appended, within 63 characters: the name for a candidate
/// whose preferred name is taken.
pub fn suffixed_name(base: &str, instance_id: &str) -> String {
    let hex = instance_id.strip_prefix("i-").unwrap_or(instance_id);
    if base == instance_id {
        return base.to_owned();
    }
    let room = 63usize.saturating_sub(hex.len() + 1);
    let mut head: String = base.chars().take(room).collect();
    while head.ends_with('-') {
        head.pop();
    }
    format!("{head}-{hex}")
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// Whether `key` is a valid label key (an optional DNS subdomain prefix and `/`, then a name).
pub fn is_label_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    }
}

/// Whether `value` is a valid label value (empty, or a label name).
pub fn is_label_value(value: &str) -> bool {
    value.is_empty() || is_label_name(value)
}

/// Keys the import never copies into labels: Kubernetes' own prefixes and the operator's.
fn reserved_label_key(key: &str) -> bool {
    let prefix = key.split_once('/').map(|(p, _)| p).unwrap_or("");
    prefix == "fleet.valet.dev"
        || prefix.ends_with(".fleet.valet.dev")
        || prefix == "kubernetes.io"
        || prefix.ends_with(".kubernetes.io")
        || prefix == "k8s.io"
        || prefix.ends_with(".k8s.io")
}

/// Splits source tags into labels and the rest (kept as a JSON annotation, never dropped).
fn tags_to_labels(
    tags: &serde_json::Map<String, serde_json::Value>,
    labels: &mut BTreeMap<String, String>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut rest = serde_json::Map::new();
    for (k, v) in tags {
        let text = match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        match text {
            Some(t) if is_label_key(k) && is_label_value(&t) && !reserved_label_key(k) => {
                labels.insert(k.clone(), t);
            }
            _ => {
                rest.insert(k.clone(), v.clone());
            }
        }
    }
    rest
}

fn base_metadata(
    source: &SourceRef,
    opts: &Options,
    tags: &serde_json::Map<String, serde_json::Value>,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut labels = BTreeMap::new();
    let rest = tags_to_labels(tags, &mut labels);
    labels.extend(opts.labels.clone());
    labels.insert(IMPORTED_FROM_LABEL.into(), source.kind().into());
    let mut annotations = BTreeMap::new();
    annotations.insert(IMPORT_SOURCE_ANNOTATION.into(), source.annotation());
    if !rest.is_empty() {
        annotations.insert(
            IMPORTED_TAGS_ANNOTATION.into(),
            serde_json::Value::Object(rest).to_string(),
        );
    }
    (labels, annotations)
}

/// The parts of the spec every source sets the same way.
#[allow(clippy::too_many_arguments)]
fn spec(
    opts: &Options,
    environment: Environment,
    instance_id: &str,
    instance_type: Option<String>,
    browser_engine: BrowserEngine,
    capacity: i32,
    stopped: bool,
    idle_after: Option<String>,
    notes: &mut Vec<String>,
) -> SandboxSpec {
    let observe_only = opts.management_policy == ManagementPolicy::ObserveOnly;
    let auto_stop = match idle_after {
        Some(idle) if observe_only => {
            notes.push(format!(
                "auto-stop after {idle} not carried: ObserveOnly never stops an instance"
            ));
            None
        }
        other => other.map(|idle_after| AutoStopSpec { idle_after }),
    };
    SandboxSpec {
        environment,
        instance_type,
        browser_engine,
        capacity,
        launch: None,
        instance_id: Some(instance_id.to_owned()),
        management_policy: opts.management_policy,
        // The power state the instance is in: adopting starts or stops nothing. ObserveOnly
        // allows only Running (it never acts on the power state anyway).
        power_state: if stopped && !observe_only {
            PowerState::Stopped
        } else {
            PowerState::Running
        },
        auto_stop,
        image: None,
        agent: AgentSpec {
            token_secret_ref: opts.agent_token.clone(),
            ..AgentSpec::default()
        },
        deletion_policy: Some(DeletionPolicy::Retain),
    }
}

// ---------------------------------------------------------------------------------------------
// A row of the table

const SANDBOX_STATUSES: &[&str] = &[
    "provisioning",
    "active",
    "deploying",
    "unhealthy",
    "stopping",
    "stopped",
    "terminating",
    "terminated",
];
const EC2_STATES: &[&str] = &[
    "pending",
    "running",
    "stopping",
    "stopped",
    "shutting-down",
    "terminated",
];

/// A row of the seeds' `sandboxes` table as a candidate Sandbox, or why it cannot be one.
///
/// Skipped: rows without an instance id or with one EC2 never issues; `terminated` and
/// `terminating` rows and rows whose `ec2_status` is `terminated` or `shutting-down` (the old
/// system ended them: adopting would only make a Failed Sandbox); any enum value the importer does
/// not know; values outside the API's bounds (capacity 1-256, auto-stop at least 1 minute, an
/// instance type like `t3.large`). Stopped instances are imported with `powerState: Stopped`.
pub fn map_row(row: &TableRow, opts: &Options) -> Mapped {
    let source = SourceRef::Row {
        id: row.id.clone(),
        name: row.name.clone(),
    };
    let environment = match row.environment.as_deref() {
        None => return skip(&source, "environment is NULL"),
        Some(e) => match parse_environment(e) {
            Some(e) => e,
            None => {
                return skip(
                    &source,
                    format!("environment {e:?} is not one of dev, staging, prod"),
                );
            }
        },
    };
    if opts.environment.is_some_and(|want| want != environment) {
        return Mapped::NotSelected;
    }
    let status = row.status.as_deref().unwrap_or("active");
    if !SANDBOX_STATUSES.contains(&status) {
        return skip(
            &source,
            format!(
                "status {status:?} is not one of {}",
                SANDBOX_STATUSES.join(", ")
            ),
        );
    }
    match status {
        "terminated" => {
            return skip(
                &source,
                "status terminated: the instance is gone (terminated rows are not imported)",
            );
        }
        "terminating" => {
            return skip(
                &source,
                "status terminating: the old terminate workflow is removing it",
            );
        }
        _ => {}
    }
    if let Some(s) = row.ec2_status.as_deref() {
        if !EC2_STATES.contains(&s) {
            return skip(
                &source,
                format!("ec2_status {s:?} is not one of {}", EC2_STATES.join(", ")),
            );
        }
        if matches!(s, "terminated" | "shutting-down") {
            return skip(&source, format!("ec2_status {s}: the instance is gone"));
        }
    }
    let instance_id = match row.instance_id.as_deref().map(str::trim) {
        None | Some("") => {
            return skip(
                &source,
                format!("no instance_id (status {status}): there is no instance to adopt"),
            );
        }
        Some(id) if !is_instance_id(id) => {
            return skip(
                &source,
                format!(
                    "instance_id {id:?} is not an EC2 instance id (i- and 8 or 17 lower-case hex digits)"
                ),
            );
        }
        Some(id) => id.to_owned(),
    };
    let browser_engine = match row.browser_engine.as_deref() {
        None => opts.browser_engine.unwrap_or(BrowserEngine::Adspower),
        Some(b) => match parse_browser_engine(b) {
            Some(b) => b,
            None => {
                return skip(
                    &source,
                    format!("browser_engine {b:?} is not one of chromium, adspower"),
                );
            }
        },
    };
    let capacity = row
        .capacity
        .or(opts.capacity)
        .unwrap_or(SEED_DEFAULT_CAPACITY);
    if !CAPACITY_RANGE.contains(&capacity) {
        return skip(
            &source,
            format!("capacity {capacity} is outside 1-256, the Sandbox API's range"),
        );
    }
    let instance_type = match row.instance_type.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(t) if is_instance_type(t) => Some(t.to_owned()),
        Some(t) => {
            return skip(
                &source,
                format!("instance_type {t:?} is not an EC2 instance type such as t3.large"),
            );
        }
    };
    let idle_after = match row.auto_stop_enabled {
        Some(true) => {
            let minutes = row
                .idle_minutes_before_stop
                .unwrap_or(SEED_DEFAULT_IDLE_MINUTES);
            if minutes < 1 {
                return skip(
                    &source,
                    format!(
                        "idle_minutes_before_stop {minutes} with auto_stop_enabled: auto-stop needs at least 1 minute"
                    ),
                );
            }
            Some(format!("{minutes}m"))
        }
        Some(false) => None,
        None => opts.auto_stop.clone(),
    };
    let stopped = match row.ec2_status.as_deref() {
        Some(s) => matches!(s, "stopped" | "stopping"),
        None => matches!(status, "stopped" | "stopping"),
    };

    let tags = match row
        .tags
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>)
    {
        None | Some(Ok(serde_json::Value::Null)) => serde_json::Map::new(),
        Some(Ok(serde_json::Value::Object(m))) => m,
        Some(_) => {
            let mut m = serde_json::Map::new();
            m.insert(
                "tags".into(),
                serde_json::Value::String(row.tags.clone().unwrap_or_default()),
            );
            m
        }
    };
    let (labels, annotations) = base_metadata(&source, opts, &tags);
    let mut notes = Vec::new();
    if annotations.contains_key(IMPORTED_TAGS_ANNOTATION) {
        notes.push(format!(
            "tags that are not valid labels kept in annotation {IMPORTED_TAGS_ANNOTATION}"
        ));
    }
    if row
        .browser_config
        .as_deref()
        .is_some_and(|c| !matches!(c.trim(), "" | "{}" | "null"))
    {
        notes.push(
            "browser_config not carried: the Sandbox API has no field for it (keep it in the instance's configuration)"
                .into(),
        );
    }
    let spec = spec(
        opts,
        environment,
        &instance_id,
        instance_type,
        browser_engine,
        capacity,
        stopped,
        idle_after,
        &mut notes,
    );
    let base_name = row
        .name
        .as_deref()
        .and_then(dns_label)
        .unwrap_or_else(|| instance_id.clone());
    Mapped::Candidate(Box::new(Candidate {
        source,
        base_name,
        instance_id,
        spec,
        labels,
        annotations,
        notes,
    }))
}

// ---------------------------------------------------------------------------------------------
// An EC2 instance

/// Tag keys compared without case, `-` or `_`.
fn tag_key_is(key: &str, names: &[&str]) -> bool {
    let k: String = key
        .chars()
        .filter(|c| !matches!(c, '-' | '_'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    names.contains(&k.as_str())
}

const ENVIRONMENT_TAGS: &[&str] = &["environment", "env"];
const BROWSER_ENGINE_TAGS: &[&str] = &["browserengine"];
const CAPACITY_TAGS: &[&str] = &["capacity"];

fn find_tag<'a>(tags: &'a BTreeMap<String, String>, names: &[&str]) -> Option<&'a str> {
    tags.iter()
        .find(|(k, _)| tag_key_is(k, names))
        .map(|(_, v)| v.as_str())
}

/// An EC2 instance as a candidate Sandbox, or why it cannot be one.
///
/// Read from its tags (keys compared without case, `-` or `_`): `Name` (the Sandbox's name),
/// `Environment` or `env`, `BrowserEngine`, `Capacity`; the other tags become labels where they
/// are valid ones. Skipped: instances the operator launched (tag `fleet.valet.dev/managed-by`),
/// terminated or shutting-down ones, unknown environment or engine values, a capacity outside
/// 1-256, and instances with no environment tag when `--environment` is not given.
pub fn map_instance(inst: &Ec2Instance, opts: &Options) -> Mapped {
    let name_tag = inst.tags.get("Name").filter(|n| !n.is_empty()).cloned();
    let source = SourceRef::Instance {
        id: inst.id.clone(),
        name: name_tag.clone(),
    };
    if inst.tags.contains_key(crate::ec2::TAG_MANAGED_BY) {
        let owner = match (
            inst.tags.get(crate::ec2::TAG_NAMESPACE),
            inst.tags.get(crate::ec2::TAG_NAME),
        ) {
            (Some(ns), Some(n)) => format!(" for Sandbox {ns}/{n}"),
            _ => String::new(),
        };
        return skip(
            &source,
            format!("launched by the operator{owner}: already a Sandbox"),
        );
    }
    if matches!(inst.state.as_str(), "terminated" | "shutting-down") {
        return skip(&source, format!("instance is {}", inst.state));
    }
    if !EC2_STATES.contains(&inst.state.as_str()) {
        return skip(&source, format!("unknown instance state {:?}", inst.state));
    }
    if !is_instance_id(&inst.id) {
        return skip(
            &source,
            "not an instance id the Sandbox API accepts (i- and 8 or 17 lower-case hex digits)",
        );
    }
    let environment = match find_tag(&inst.tags, ENVIRONMENT_TAGS) {
        Some(e) => match parse_environment(&e.to_ascii_lowercase()) {
            Some(e) => e,
            None => {
                return skip(
                    &source,
                    format!("environment tag {e:?} is not one of dev, staging, prod"),
                );
            }
        },
        None => match opts.environment {
            Some(e) => e,
            None => {
                return skip(
                    &source,
                    "no Environment tag, and --environment is not given",
                );
            }
        },
    };
    if opts.environment.is_some_and(|want| want != environment) {
        return Mapped::NotSelected;
    }
    let browser_engine = match find_tag(&inst.tags, BROWSER_ENGINE_TAGS) {
        Some(b) => match parse_browser_engine(&b.to_ascii_lowercase()) {
            Some(b) => b,
            None => {
                return skip(
                    &source,
                    format!("browser engine tag {b:?} is not one of chromium, adspower"),
                );
            }
        },
        None => opts.browser_engine.unwrap_or_default(),
    };
    let capacity = match find_tag(&inst.tags, CAPACITY_TAGS) {
        Some(c) => match c.trim().parse::<i32>() {
            Ok(c) if CAPACITY_RANGE.contains(&c) => c,
            _ => {
                return skip(
                    &source,
                    format!("capacity tag {c:?} is not a number in 1-256"),
                );
            }
        },
        None => opts.capacity.unwrap_or(SEED_DEFAULT_CAPACITY),
    };
    let instance_type = inst.instance_type.clone().filter(|t| is_instance_type(t));
    let stopped = matches!(inst.state.as_str(), "stopped" | "stopping");

    let tags: serde_json::Map<String, serde_json::Value> = inst
        .tags
        .iter()
        .filter(|(k, _)| {
            k.as_str() != "Name"
                && !k.starts_with("aws:")
                && !tag_key_is(k, ENVIRONMENT_TAGS)
                && !tag_key_is(k, BROWSER_ENGINE_TAGS)
                && !tag_key_is(k, CAPACITY_TAGS)
        })
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let (labels, annotations) = base_metadata(&source, opts, &tags);
    let mut notes = Vec::new();
    if annotations.contains_key(IMPORTED_TAGS_ANNOTATION) {
        notes.push(format!(
            "tags that are not valid labels kept in annotation {IMPORTED_TAGS_ANNOTATION}"
        ));
    }
    let spec = spec(
        opts,
        environment,
        &inst.id,
        instance_type,
        browser_engine,
        capacity,
        stopped,
        opts.auto_stop.clone(),
        &mut notes,
    );
    let base_name = name_tag
        .as_deref()
        .and_then(dns_label)
        .unwrap_or_else(|| inst.id.clone());
    Mapped::Candidate(Box::new(Candidate {
        source,
        base_name,
        instance_id: inst.id.clone(),
        spec,
        labels,
        annotations,
        notes,
    }))
}

// ---------------------------------------------------------------------------------------------
// The plan

/// A Sandbox already in the cluster, as the plan needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Existing {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `spec.instanceId` and `status.instance.id`, those that are set.
    pub instance_ids: Vec<String>,
    /// Its spec, for the differences the dry run shows.
    pub spec: Option<SandboxSpec>,
}

impl Existing {
    /// The plan's view of a Sandbox from the cluster.
    pub fn from_sandbox(s: &Sandbox) -> Existing {
        let mut ids: Vec<String> = s.spec.instance_id.iter().cloned().collect();
        if let Some(id) = s.status.as_ref().and_then(|st| st.instance.as_ref())
            && !ids.contains(&id.id)
        {
            ids.push(id.id.clone());
        }
        Existing {
            namespace: s.metadata.namespace.clone().unwrap_or_default(),
            name: s.metadata.name.clone().unwrap_or_default(),
            instance_ids: ids,
            spec: Some(s.spec.clone()),
        }
    }
}

/// One line of the plan.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    /// A new Sandbox.
    Create {
        /// Its manifest.
        manifest: Box<Sandbox>,
        /// The source record.
        source: SourceRef,
        /// What was not carried over.
        notes: Vec<String>,
    },
    /// The instance is already a Sandbox: nothing is written.
    Exists {
        /// The source record.
        source: SourceRef,
        /// The instance.
        instance_id: String,
        /// `namespace/name` of the Sandbox that has it.
        sandbox: String,
        /// Where that Sandbox's spec differs from what the source says.
        differences: Vec<String>,
    },
    /// Not imported, and why.
    Skip {
        /// The source record.
        source: SourceRef,
        /// Why.
        reason: String,
    },
}

/// What the import will do, in source order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// One entry per record read (but those of other environments).
    pub entries: Vec<Entry>,
    /// Records of other environments than the one asked for.
    pub not_selected: usize,
}

impl Plan {
    /// The manifests to write, in order.
    pub fn manifests(&self) -> impl Iterator<Item = &Sandbox> {
        self.entries.iter().filter_map(|e| match e {
            Entry::Create { manifest, .. } => Some(manifest.as_ref()),
            _ => None,
        })
    }

    /// (to create, already there, skipped).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for e in &self.entries {
            match e {
                Entry::Create { .. } => c.0 += 1,
                Entry::Exists { .. } => c.1 += 1,
                Entry::Skip { .. } => c.2 += 1,
            }
        }
        c
    }
}

fn differences(existing: &SandboxSpec, wanted: &SandboxSpec) -> Vec<String> {
    fn show<T: serde::Serialize>(v: &T) -> String {
        match serde_json::to_value(v) {
            Ok(serde_json::Value::String(s)) => s,
            Ok(serde_json::Value::Null) => "unset".into(),
            Ok(v) => v.to_string(),
            Err(_) => "?".into(),
        }
    }
    let mut out = Vec::new();
    let mut cmp = |field: &str, have: String, want: String| {
        if have != want {
            out.push(format!(
                "{field} {have} in the cluster, {want} in the source"
            ));
        }
    };
    cmp(
        "environment",
        show(&existing.environment),
        show(&wanted.environment),
    );
    if wanted.instance_type.is_some() {
        cmp(
            "instanceType",
            show(&existing.instance_type),
            show(&wanted.instance_type),
        );
    }
    cmp(
        "browserEngine",
        show(&existing.browser_engine),
        show(&wanted.browser_engine),
    );
    cmp("capacity", show(&existing.capacity), show(&wanted.capacity));
    cmp(
        "powerState",
        show(&existing.power_state),
        show(&wanted.power_state),
    );
    cmp(
        "autoStop.idleAfter",
        show(&existing.auto_stop.as_ref().map(|a| &a.idle_after)),
        show(&wanted.auto_stop.as_ref().map(|a| &a.idle_after)),
    );
    out
}

/// The plan: each candidate checked against the ones before it (an instance is imported once,
/// from its first record) and against the Sandboxes in the cluster (an instance a Sandbox
/// already adopted or launched is reported, not written again), then named: the preferred name
/// when it is free in `namespace`, else that name with the instance id's hex appended. Records
/// come in source order (oldest first), so an older record keeps a contested name. The
/// manifests carry `namespace` only when `write_namespace` is set (a GitOps layout usually sets
/// it in its kustomization).
pub fn plan(
    mapped: impl IntoIterator<Item = Mapped>,
    existing: &[Existing],
    namespace: &str,
    write_namespace: bool,
) -> Plan {
    let by_instance: BTreeMap<&str, &Existing> = existing
        .iter()
        .flat_map(|e| e.instance_ids.iter().map(move |id| (id.as_str(), e)))
        .collect();
    let ns = namespace;
    let mut taken: BTreeSet<String> = existing
        .iter()
        .filter(|e| e.namespace == ns)
        .map(|e| e.name.clone())
        .collect();
    let mut first_record: BTreeMap<String, SourceRef> = BTreeMap::new();
    let mut out = Plan::default();
    for m in mapped {
        let c = match m {
            Mapped::NotSelected => {
                out.not_selected += 1;
                continue;
            }
            Mapped::Skip { source, reason } => {
                out.entries.push(Entry::Skip { source, reason });
                continue;
            }
            Mapped::Candidate(c) => *c,
        };
        if let Some(first) = first_record.get(&c.instance_id) {
            out.entries.push(Entry::Skip {
                reason: format!(
                    "instance {} is also in {first}, which is imported instead",
                    c.instance_id
                ),
                source: c.source,
            });
            continue;
        }
        first_record.insert(c.instance_id.clone(), c.source.clone());
        if let Some(e) = by_instance.get(c.instance_id.as_str()) {
            out.entries.push(Entry::Exists {
                differences: e
                    .spec
                    .as_ref()
                    .map(|s| differences(s, &c.spec))
                    .unwrap_or_default(),
                source: c.source,
                instance_id: c.instance_id,
                sandbox: format!("{}/{}", e.namespace, e.name),
            });
            continue;
        }
        let name = if !taken.contains(&c.base_name) {
            c.base_name.clone()
        } else {
            let alt = suffixed_name(&c.base_name, &c.instance_id);
            if taken.contains(&alt) {
                out.entries.push(Entry::Skip {
                    reason: format!(
                        "the names {} and {alt} are both taken in namespace {ns} by Sandboxes of other instances",
                        c.base_name
                    ),
                    source: c.source,
                });
                continue;
            }
            alt
        };
        taken.insert(name.clone());
        let mut annotations = c.annotations;
        if let Some(orig) = c.source.source_name()
            && orig != name
        {
            annotations.insert(IMPORTED_NAME_ANNOTATION.into(), orig.to_owned());
        }
        let manifest = Sandbox {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: write_namespace.then(|| namespace.to_owned()),
                labels: Some(c.labels),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            spec: c.spec,
            status: None,
        };
        out.entries.push(Entry::Create {
            manifest: Box::new(manifest),
            source: c.source,
            notes: c.notes,
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Output

/// A manifest as YAML: [`manifest_value`].
pub fn manifest_yaml(s: &Sandbox) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&manifest_value(s)?)
}

/// A manifest as JSON, without the fields that only restate the API's defaults (the agent's
/// port and probe settings, `managementPolicy: Full`, `powerState: Running`), and without
/// `image`: a SandboxDeploy's field manager owns `image.tag`.
pub fn manifest_value(s: &Sandbox) -> Result<serde_json::Value, serde_yaml::Error> {
    let mut v =
        serde_json::to_value(s).map_err(<serde_yaml::Error as serde::ser::Error>::custom)?;
    if let Some(obj) = v.as_object_mut() {
        obj.remove("status");
    }
    if let Some(spec) = v.get_mut("spec").and_then(|s| s.as_object_mut()) {
        spec.remove("image");
        if spec.get("managementPolicy").and_then(|p| p.as_str()) == Some("Full") {
            spec.remove("managementPolicy");
        }
        if spec.get("powerState").and_then(|p| p.as_str()) == Some("Running") {
            spec.remove("powerState");
        }
        let defaults = serde_json::to_value(AgentSpec::default()).unwrap_or_default();
        if let (Some(agent), Some(defaults)) = (
            spec.get_mut("agent").and_then(|a| a.as_object_mut()),
            defaults.as_object(),
        ) {
            agent.retain(|k, v| defaults.get(k) != Some(v));
        }
        if spec
            .get("agent")
            .and_then(|a| a.as_object())
            .is_some_and(|a| a.is_empty())
        {
            spec.remove("agent");
        }
    }
    Ok(v)
}

/// Every manifest as one multi-document stream.
pub fn manifests_yaml(plan: &Plan) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for m in plan.manifests() {
        out.push_str("---\n");
        out.push_str(&manifest_yaml(m)?);
    }
    Ok(out)
}

fn qualified(m: &Sandbox) -> String {
    match &m.metadata.namespace {
        Some(ns) => format!("{ns}/{}", m.metadata.name.as_deref().unwrap_or("")),
        None => m.metadata.name.clone().unwrap_or_default(),
    }
}

/// The report: one line per record (`create`, `exists`, `skip`), notes indented under their
/// line, and a summary. `verbose` false leaves out the `create` and `exists` lines (the
/// manifests say it), keeping every skipped record and every note.
pub fn report(plan: &Plan, verbose: bool) -> String {
    let mut out = String::new();
    for e in &plan.entries {
        match e {
            Entry::Create {
                manifest,
                source,
                notes,
            } => {
                if verbose {
                    let s = &manifest.spec;
                    let _ = writeln!(
                        out,
                        "create  {}  {}  from {source}: {}, {}, {}, capacity {}{}{}",
                        qualified(manifest),
                        s.instance_id.as_deref().unwrap_or(""),
                        s.environment,
                        s.instance_type.as_deref().unwrap_or("type from EC2"),
                        serde_json::to_value(s.browser_engine)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        s.capacity,
                        s.auto_stop
                            .as_ref()
                            .map(|a| format!(", auto-stop {}", a.idle_after))
                            .unwrap_or_default(),
                        if s.power_state == PowerState::Stopped {
                            ", stopped"
                        } else {
                            ""
                        },
                    );
                }
                for n in notes {
                    if verbose {
                        let _ = writeln!(out, "        note: {n}");
                    } else {
                        let _ = writeln!(out, "note: {source}: {n}");
                    }
                }
            }
            Entry::Exists {
                source,
                instance_id,
                sandbox,
                differences,
            } => {
                let _ = writeln!(
                    out,
                    "exists  {sandbox}  {instance_id}  from {source}: already a Sandbox, not written"
                );
                if verbose {
                    for d in differences {
                        let _ = writeln!(out, "        differs: {d}");
                    }
                }
            }
            Entry::Skip { source, reason } => {
                let _ = writeln!(out, "skip    {source}: {reason}");
            }
        }
    }
    let (create, exists, skipped) = plan.counts();
    let _ = write!(
        out,
        "{create} to create, {exists} already Sandboxes, {skipped} skipped"
    );
    if plan.not_selected > 0 {
        let _ = write!(
            out,
            ", {} of other environments not selected",
            plan.not_selected
        );
    }
    out.push('\n');
    out
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
