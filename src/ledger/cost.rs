//! Prices, interval arithmetic and the cost report: pure functions over what the database summed.
//!
//! Money is computed in integers (nano-dollars per hour times microseconds), so a known interval at
//! a known price gives an exact figure; it becomes a float only for output.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use super::LedgerError;
use super::db::{IdleGap, RunTime};

const US_PER_HOUR: i128 = 3_600_000_000;
const NANOS_PER_UNIT: f64 = 1e9;

/// One instance type's hourly prices.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct InstancePrice {
    /// On-demand price per hour.
    #[serde(alias = "onDemand", alias = "on-demand")]
    pub on_demand: f64,
    /// Spot price per hour (spot hours of a type without one are reported unpriced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot: Option<f64>,
}

/// Hourly prices per instance type, in one currency.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PriceList {
    /// The currency, `USD` unless the file says otherwise.
    #[serde(default = "usd")]
    pub currency: String,
    /// Where the prices came from (a file path, or the seeds' table).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// Prices per instance type (`t3.large`, ...).
    pub prices: BTreeMap<String, InstancePrice>,
}

fn usd() -> String {
    "USD".into()
}

/// A price file: the prices it names replace the default list's for those types (the others are
/// kept), unless `replace: true`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    replace: bool,
    prices: BTreeMap<String, InstancePrice>,
}

impl Default for PriceList {
    fn default() -> Self {
        Self::seeds()
    }
}

impl PriceList {
    /// The seeds' table (us-east-1, Feb 2026): t3.medium $0.0416 on-demand / $0.0160 spot,
    /// t3.large $0.0832 / $0.0340, t3.xlarge $0.1664 / $0.0650 per hour.
    pub fn seeds() -> Self {
        let p = |on_demand, spot| InstancePrice {
            on_demand,
            spot: Some(spot),
        };
        Self {
            currency: usd(),
            source: "default (us-east-1, Feb 2026)".into(),
            prices: BTreeMap::from([
                ("t3.medium".to_string(), p(0.0416, 0.0160)),
                ("t3.large".to_string(), p(0.0832, 0.0340)),
                ("t3.xlarge".to_string(), p(0.1664, 0.0650)),
            ]),
        }
    }

    /// The default list overridden by a YAML or JSON file:
    /// `{currency: USD, replace: false, prices: {t3.large: {on_demand: 0.0832, spot: 0.034}}}`.
    pub fn from_file(path: &Path) -> Result<Self, LedgerError> {
        let text = std::fs::read_to_string(path).map_err(|source| LedgerError::PriceFile {
            path: path.to_path_buf(),
            reason: source.to_string(),
        })?;
        Self::seeds().with_overrides(&text, &path.display().to_string())
    }

    /// This list overridden by a price file's text (YAML or JSON).
    pub fn with_overrides(mut self, text: &str, source: &str) -> Result<Self, LedgerError> {
        let bad = |reason: String| LedgerError::PriceFile {
            path: source.into(),
            reason,
        };
        let file: PriceFile = serde_yaml::from_str(text).map_err(|e| bad(e.to_string()))?;
        for (ty, p) in &file.prices {
            let ok = |v: f64| v.is_finite() && v >= 0.0;
            if !ok(p.on_demand) || !p.spot.is_none_or(ok) {
                return Err(bad(format!("{ty}: prices must be non-negative numbers")));
            }
        }
        if file.replace {
            self.prices.clear();
        }
        self.prices.extend(file.prices);
        if let Some(c) = file.currency {
            self.currency = c;
        }
        self.source = source.to_string();
        Ok(self)
    }

    /// The hourly price of a type in a market (`on-demand` or `spot`), in nano-units.
    pub fn hourly_nanos(&self, instance_type: Option<&str>, market: &str) -> Option<i128> {
        let p = self.prices.get(instance_type?)?;
        let price = match market {
            "spot" => p.spot?,
            _ => p.on_demand,
        };
        Some((price * NANOS_PER_UNIT).round() as i128)
    }
}

/// The length of `[start, stop)` (open when `stop` is `None`: up to `until`) inside
/// `[since, until)`, in microseconds; 0 when they do not meet.
pub fn overlap_us(start: i64, stop: Option<i64>, since: i64, until: i64) -> i64 {
    let stop = stop.map_or(until, |s| s.min(until));
    (stop - start.max(since)).max(0)
}

/// The cost of `us` microseconds at `nanos_per_hour`, in nano-units, rounded half up.
pub fn cost_nanos(nanos_per_hour: i128, us: i64) -> i128 {
    let num = nanos_per_hour * i128::from(us);
    (num + US_PER_HOUR / 2).div_euclid(US_PER_HOUR)
}

fn hours(us: i64) -> f64 {
    us as f64 / US_PER_HOUR as f64
}

fn money(nanos: i128) -> f64 {
    nanos as f64 / NANOS_PER_UNIT
}

/// Parses `--since`: a duration back from `now` (`30d`, `12h`, `2w`, `90m`, `1d12h`), an RFC 3339
/// time, or a date (midnight UTC).
pub fn parse_since(s: &str, now: Timestamp) -> Result<Timestamp, LedgerError> {
    parse_time_or_ago(s, now).ok_or_else(|| LedgerError::Since(s.to_string()))
}

fn parse_time_or_ago(s: &str, now: Timestamp) -> Option<Timestamp> {
    let s = s.trim();
    if let Ok(t) = s.parse::<Timestamp>() {
        return Some(t);
    }
    if let Ok(d) = s.parse::<jiff::civil::Date>() {
        return d
            .to_zoned(jiff::tz::TimeZone::UTC)
            .ok()
            .map(|z| z.timestamp());
    }
    let ago = parse_ago(s)?;
    now.checked_sub(ago).ok()
}

/// `30d`, `12h`, `2w`, `90m`, `45s`, `1d12h`.
pub fn parse_ago(s: &str) -> Option<SignedDuration> {
    if s.is_empty() {
        return None;
    }
    let mut total: i64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let end = rest.find(|c: char| !c.is_ascii_digit())?;
        if end == 0 {
            return None;
        }
        let n: i64 = rest[..end].parse().ok()?;
        let unit = rest[end..].chars().next()?;
        let secs = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(secs)?)?;
        rest = &rest[end + unit.len_utf8()..];
    }
    Some(SignedDuration::from_secs(total))
}

/// The cost of one sandbox's instances of one type in one market.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct CostLine {
    /// The instance type (unset when never observed).
    pub instance_type: Option<String>,
    /// `on-demand` or `spot`.
    pub market: String,
    /// Hours running within the window.
    pub hours: f64,
    /// The hourly price used (unset: not in the price list).
    pub price_per_hour: Option<f64>,
    /// `hours` times the price (unset when unpriced).
    pub cost: Option<f64>,
    /// Hours stopped by auto-stop (reason Idle) that it would otherwise have run.
    pub idle_stopped_hours: f64,
    /// What those hours would have cost.
    pub saved: Option<f64>,
}

/// The cost of one sandbox (or of an instance no sandbox was recorded for).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct SandboxCost {
    /// Its namespace (empty for an instance without a recorded sandbox).
    pub namespace: String,
    /// Its name (the instance id for an instance without a recorded sandbox).
    pub name: String,
    /// The instances it ran on within the window.
    pub instances: Vec<String>,
    /// One line per instance type and market.
    pub lines: Vec<CostLine>,
    /// Hours running.
    pub hours: f64,
    /// Cost of the priced hours.
    pub cost: f64,
    /// Hours auto-stop saved.
    pub idle_stopped_hours: f64,
    /// What auto-stop saved.
    pub saved: f64,
}

/// Sums over the fleet.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct CostTotal {
    /// Hours running.
    pub hours: f64,
    /// Cost of the priced hours.
    pub cost: f64,
    /// Hours auto-stop saved.
    pub idle_stopped_hours: f64,
    /// What auto-stop saved.
    pub saved: f64,
}

/// `report cost`.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct CostReport {
    /// The window's start.
    pub since: Timestamp,
    /// The window's end.
    pub until: Timestamp,
    /// The price list's currency.
    pub currency: String,
    /// Where the prices came from.
    pub prices: String,
    /// Per sandbox, by namespace and name.
    pub sandboxes: Vec<SandboxCost>,
    /// The fleet's total.
    pub total: CostTotal,
    /// Instance types (and markets) that ran but have no price: their hours are counted, their
    /// cost is not.
    pub unpriced: Vec<String>,
}

#[derive(Default)]
struct LineAcc {
    run_us: i64,
    idle_us: i64,
}

/// Builds the report from the database's sums: running time per sandbox/instance/type/market and
/// the auto-stop gaps.
pub(crate) fn build_report(
    since: Timestamp,
    until: Timestamp,
    prices: &PriceList,
    run: &[RunTime],
    gaps: &[IdleGap],
) -> CostReport {
    type LineKey = (String, String, Option<String>, String);
    let (since_us, until_us) = (since.as_microsecond(), until.as_microsecond());
    let sandbox_key = |ns: &Option<String>, name: &Option<String>, instance: &str| match name {
        Some(n) => (ns.clone().unwrap_or_default(), n.clone()),
        None => (String::new(), instance.to_string()),
    };
    let mut lines: BTreeMap<LineKey, LineAcc> = BTreeMap::new();
    let mut instances: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for r in run {
        let (ns, name) = sandbox_key(&r.namespace, &r.name, &r.instance_id);
        instances
            .entry((ns.clone(), name.clone()))
            .or_default()
            .insert(r.instance_id.clone());
        lines
            .entry((ns, name, r.instance_type.clone(), r.market.clone()))
            .or_default()
            .run_us += r.run_us;
    }
    for g in gaps {
        let idle = overlap_us(g.stop_us, g.next_start_us, since_us, until_us);
        if idle == 0 {
            continue;
        }
        let (ns, name) = sandbox_key(&g.namespace, &g.name, &g.instance_id);
        instances
            .entry((ns.clone(), name.clone()))
            .or_default()
            .insert(g.instance_id.clone());
        lines
            .entry((ns, name, g.instance_type.clone(), g.market.clone()))
            .or_default()
            .idle_us += idle;
    }

    let mut unpriced = BTreeSet::new();
    let mut sandboxes: Vec<SandboxCost> = Vec::new();
    let (mut t_run, mut t_idle, mut t_cost, mut t_saved) = (0i64, 0i64, 0i128, 0i128);
    let mut current: Option<(SandboxCost, i64, i64, i128, i128)> = None;
    let flush = |c: Option<(SandboxCost, i64, i64, i128, i128)>, out: &mut Vec<SandboxCost>| {
        if let Some((mut s, run, idle, cost, saved)) = c {
            s.hours = hours(run);
            s.idle_stopped_hours = hours(idle);
            s.cost = money(cost);
            s.saved = money(saved);
            out.push(s);
        }
    };
    for ((ns, name, ty, market), acc) in lines {
        let price = prices.hourly_nanos(ty.as_deref(), &market);
        if price.is_none() {
            unpriced.insert(format!(
                "{} ({market})",
                ty.clone().unwrap_or_else(|| "unknown type".into())
            ));
        }
        let cost = price.map(|p| cost_nanos(p, acc.run_us));
        let saved = price.map(|p| cost_nanos(p, acc.idle_us));
        let line = CostLine {
            instance_type: ty,
            market,
            hours: hours(acc.run_us),
            price_per_hour: price.map(money),
            cost: cost.map(money),
            idle_stopped_hours: hours(acc.idle_us),
            saved: saved.map(money),
        };
        let same = current
            .as_ref()
            .is_some_and(|(s, ..)| s.namespace == ns && s.name == name);
        if !same {
            flush(current.take(), &mut sandboxes);
            let inst = instances
                .get(&(ns.clone(), name.clone()))
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            current = Some((
                SandboxCost {
                    namespace: ns,
                    name,
                    instances: inst,
                    lines: Vec::new(),
                    hours: 0.0,
                    cost: 0.0,
                    idle_stopped_hours: 0.0,
                    saved: 0.0,
                },
                0,
                0,
                0,
                0,
            ));
        }
        let c = current.as_mut().expect("set above");
        c.0.lines.push(line);
        c.1 += acc.run_us;
        c.2 += acc.idle_us;
        c.3 += cost.unwrap_or(0);
        c.4 += saved.unwrap_or(0);
        t_run += acc.run_us;
        t_idle += acc.idle_us;
        t_cost += cost.unwrap_or(0);
        t_saved += saved.unwrap_or(0);
    }
    flush(current.take(), &mut sandboxes);
    CostReport {
        since,
        until,
        currency: prices.currency.clone(),
        prices: prices.source.clone(),
        sandboxes,
        total: CostTotal {
            hours: hours(t_run),
            cost: money(t_cost),
            idle_stopped_hours: hours(t_idle),
            saved: money(t_saved),
        },
        unpriced: unpriced.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000_000;

    #[test]
    fn overlap_clips_to_the_window() {
        assert_eq!(overlap_us(0, Some(10), 0, 100), 10);
        assert_eq!(
            overlap_us(-5, Some(10), 0, 100),
            10,
            "starts before the window"
        );
        assert_eq!(
            overlap_us(90, Some(120), 0, 100),
            10,
            "ends after the window"
        );
        assert_eq!(overlap_us(90, None, 0, 100), 10, "still open");
        assert_eq!(overlap_us(100, None, 0, 100), 0, "starts at the end");
        assert_eq!(overlap_us(-20, Some(-10), 0, 100), 0, "before the window");
        assert_eq!(overlap_us(5, Some(5), 0, 100), 0, "zero length");
    }

    #[test]
    fn cost_is_exact_in_integers() {
        let prices = PriceList::seeds();
        let od = prices.hourly_nanos(Some("t3.large"), "on-demand").unwrap();
        assert_eq!(od, 83_200_000);
        assert_eq!(cost_nanos(od, 10 * H), 832_000_000);
        let spot = prices.hourly_nanos(Some("t3.medium"), "spot").unwrap();
        assert_eq!(
            cost_nanos(spot, 90 * 60 * 1_000_000),
            24_000_000,
            "1.5 h at $0.016"
        );
        assert_eq!(money(832_000_000), 0.832);
        assert_eq!(prices.hourly_nanos(Some("m5.large"), "on-demand"), None);
        assert_eq!(prices.hourly_nanos(None, "on-demand"), None);
        assert_eq!(cost_nanos(1, 1_800_000_000), 1, "rounds half up");
    }

    #[test]
    fn price_files_override_the_default_list() {
        let yaml =
            "prices:\n  t3.large: {on_demand: 0.1, spot: 0.05}\n  m5.large: {onDemand: 0.096}\n";
        let p = PriceList::seeds().with_overrides(yaml, "p.yaml").unwrap();
        assert_eq!(
            p.hourly_nanos(Some("t3.large"), "on-demand"),
            Some(100_000_000)
        );
        assert_eq!(
            p.hourly_nanos(Some("m5.large"), "on-demand"),
            Some(96_000_000)
        );
        assert_eq!(p.hourly_nanos(Some("m5.large"), "spot"), None);
        assert_eq!(
            p.hourly_nanos(Some("t3.medium"), "spot"),
            Some(16_000_000),
            "kept"
        );
        assert_eq!(p.source, "p.yaml");

        let json =
            r#"{"currency": "EUR", "replace": true, "prices": {"t3.nano": {"on_demand": 0.005}}}"#;
        let p = PriceList::seeds().with_overrides(json, "p.json").unwrap();
        assert_eq!(p.currency, "EUR");
        assert_eq!(p.prices.len(), 1);

        assert!(
            PriceList::seeds()
                .with_overrides("prices: {a: {on_demand: -1}}", "x")
                .is_err()
        );
        assert!(
            PriceList::seeds()
                .with_overrides("pricez: {}", "x")
                .is_err()
        );
    }

    #[test]
    fn since_takes_durations_times_and_dates() {
        let now: Timestamp = "2024-03-31T00:00:00Z".parse().unwrap();
        assert_eq!(
            parse_since("30d", now).unwrap(),
            "2024-03-01T00:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            parse_since("1d12h", now).unwrap(),
            "2024-03-29T12:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            parse_since("2024-01-01", now).unwrap(),
            "2024-01-01T00:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            parse_since("2024-01-01T06:00:00+02:00", now).unwrap(),
            "2024-01-01T04:00:00Z".parse::<Timestamp>().unwrap()
        );
        for bad in ["", "30", "d", "30x", "-1d", "yesterday"] {
            assert!(parse_since(bad, now).is_err(), "{bad:?}");
        }
    }

    fn run(ns: &str, name: &str, i: &str, ty: &str, market: &str, run_us: i64) -> RunTime {
        RunTime {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            instance_id: i.into(),
            instance_type: Some(ty.into()),
            market: market.into(),
            run_us,
            intervals: 1,
        }
    }

    #[test]
    fn report_groups_per_sandbox_and_sums() {
        let since: Timestamp = "2024-01-01T00:00:00Z".parse().unwrap();
        let until: Timestamp = "2024-01-02T00:00:00Z".parse().unwrap();
        let s = since.as_microsecond();
        let runs = vec![
            run("ns", "a", "i-a", "t3.large", "on-demand", 10 * H),
            run("ns", "a", "i-a2", "t3.large", "spot", 2 * H),
            run("ns", "b", "i-b", "m5.large", "on-demand", 3 * H),
            RunTime {
                namespace: None,
                name: None,
                ..run("", "", "i-x", "t3.medium", "on-demand", H)
            },
        ];
        let gaps = vec![IdleGap {
            namespace: Some("ns".into()),
            name: Some("a".into()),
            instance_id: "i-a".into(),
            instance_type: Some("t3.large".into()),
            market: "on-demand".into(),
            stop_us: s + 10 * H,
            next_start_us: Some(s + 15 * H),
        }];
        let r = build_report(since, until, &PriceList::seeds(), &runs, &gaps);
        assert_eq!(r.sandboxes.len(), 3);
        let x = &r.sandboxes[0];
        assert_eq!((x.namespace.as_str(), x.name.as_str()), ("", "i-x"));
        let a = &r.sandboxes[1];
        assert_eq!(a.instances, vec!["i-a", "i-a2"]);
        assert_eq!(a.hours, 12.0);
        assert_eq!(a.cost, 0.9);
        assert_eq!(a.idle_stopped_hours, 5.0);
        assert_eq!(a.saved, 0.416);
        let b = &r.sandboxes[2];
        assert_eq!(b.cost, 0.0);
        assert_eq!(b.lines[0].cost, None);
        assert_eq!(r.unpriced, vec!["m5.large (on-demand)"]);
        assert_eq!(r.total.hours, 16.0);
        assert_eq!(r.total.cost, 0.9416);
        assert_eq!(r.total.saved, 0.416);
    }
}
