//! Metrics: the per-app aggregate the workers feed (cheap, no allocation per check once an app
//! is known), its encoding into datums at each flush, and the split of datums into PutMetricData
//! requests at AWS's limits.
//!
//! Invariants: every datum carries StatisticValues (SampleCount >= 1, finite Sum/Min/Max), never
//! a `Values` array, so the 150-values limit cannot be reached; a datum has at most 30 dimensions;
//! a request has at most 1000 datums and an estimated body below 1 MB. The stand-in used in tests
//! accepts requests AWS rejects, so these limits are enforced and unit-tested here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::names;

/// AWS: at most 1000 metric datums per PutMetricData.
pub const MAX_DATUMS_PER_REQUEST: usize = 1000;
/// AWS: at most 1 MB per PutMetricData request (counted before compression; we stay below).
pub const MAX_REQUEST_BYTES: usize = 1_000_000;
/// AWS: at most 30 dimensions per metric.
pub const MAX_DIMENSIONS: usize = 30;
/// AWS: at most 150 values per metric (a `Values` array); pmguard sends StatisticValues only.
pub const MAX_VALUES: usize = 150;
/// What a datum costs in a request beyond its names (numbers, timestamp, unit, framing).
const DATUM_OVERHEAD: usize = 128;

/// SampleCount / Sum / Min / Max of one metric over one flush period.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub count: f64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn one(v: f64) -> Stats {
        Stats {
            count: 1.0,
            sum: v,
            min: v,
            max: v,
        }
    }

    fn add(slot: &mut Option<Stats>, v: f64) {
        if !v.is_finite() {
            return;
        }
        match slot {
            None => *slot = Some(Stats::one(v)),
            Some(s) => {
                s.count += 1.0;
                s.sum += v;
                s.min = s.min.min(v);
                s.max = s.max.max(v);
            }
        }
    }
}

/// CloudWatch units pmguard uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unit {
    None,
    Count,
    Milliseconds,
    Percent,
    Bytes,
}

/// One metric datum, ready to send (and to spool).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Datum {
    pub name: String,
    pub dims: Vec<(String, String)>,
    pub ts_ms: u64,
    pub stats: Stats,
    pub unit: Unit,
}

impl Datum {
    /// Bytes this datum adds to a request, an upper estimate of its encoded size.
    pub fn size_estimate(&self) -> usize {
        self.name.len()
            + self
                .dims
                .iter()
                .map(|(k, v)| k.len() + v.len() + 16)
                .sum::<usize>()
            + DATUM_OVERHEAD
    }

    /// Why AWS would refuse this datum, if it would.
    pub fn invalid(&self) -> Option<&'static str> {
        let s = &self.stats;
        if self.dims.len() > MAX_DIMENSIONS {
            Some("more than 30 dimensions")
        } else if !(s.count >= 1.0
            && s.sum.is_finite()
            && s.min.is_finite()
            && s.max.is_finite()
            && s.min <= s.max)
        {
            Some("statistics are not finite or SampleCount < 1")
        } else if self.name.is_empty() || self.name.len() > 255 {
            Some("metric name must be 1 to 255 characters")
        } else if self
            .dims
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > 255 || v.is_empty() || v.len() > 1024)
        {
            Some("dimension name or value out of bounds")
        } else if self.dims.iter().any(|(_, v)| !dimension_value_ok(v)) {
            Some(DIMENSION_RULE)
        } else {
            None
        }
    }
}

/// CloudWatch's rule for a dimension value (API `Dimension`), beside the length.
pub const DIMENSION_RULE: &str =
    "a dimension value must be printable ASCII with at least one non-space character";

/// Whether CloudWatch accepts `v` as a dimension value: ASCII without control characters, and
/// not only whitespace (AWS refuses the whole PutMetricData otherwise).
pub fn dimension_value_ok(v: &str) -> bool {
    v.chars().all(|c| c.is_ascii() && !c.is_ascii_control())
        && v.chars().any(|c| !c.is_ascii_whitespace())
}

/// One app's aggregate over the current flush period.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppAggregate {
    pub status: Option<Stats>,
    pub failures: Option<Stats>,
    pub response_ms: Option<Stats>,
    pub cert_days: Option<Stats>,
    pub cpu_pct: Option<Stats>,
    pub memory: Option<Stats>,
    pub restarts: u64,
}

/// What one check measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CheckSample {
    pub healthy: bool,
    pub response_ms: Option<f64>,
    pub cert_days: Option<f64>,
    pub cpu_pct: Option<f64>,
    pub memory_bytes: Option<f64>,
}

impl AppAggregate {
    pub fn record(&mut self, s: &CheckSample) {
        Stats::add(&mut self.status, if s.healthy { 1.0 } else { 0.0 });
        Stats::add(&mut self.failures, if s.healthy { 0.0 } else { 1.0 });
        if let Some(v) = s.response_ms {
            Stats::add(&mut self.response_ms, v);
        }
        if let Some(v) = s.cert_days {
            Stats::add(&mut self.cert_days, v);
        }
        if let Some(v) = s.cpu_pct {
            Stats::add(&mut self.cpu_pct, v);
        }
        if let Some(v) = s.memory_bytes {
            Stats::add(&mut self.memory, v);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.status.is_none() && self.restarts == 0
    }
}

/// One app's datums, dimensions App (+ Fleet) + InstanceId.
fn encode_app(
    out: &mut Vec<Datum>,
    app: &str,
    a: &AppAggregate,
    instance_id: &str,
    fleet: Option<&str>,
    ts_ms: u64,
) {
    let mut dims = vec![(names::DIM_APP.to_string(), app.to_string())];
    if let Some(f) = fleet {
        dims.push((names::DIM_FLEET.to_string(), f.to_string()));
    }
    dims.push((names::DIM_INSTANCE_ID.to_string(), instance_id.to_string()));
    let mut push = |name: &str, stats: Option<Stats>, unit| {
        if let Some(stats) = stats {
            out.push(Datum {
                name: name.to_string(),
                dims: dims.clone(),
                ts_ms,
                stats,
                unit,
            });
        }
    };
    push(names::SERVICE_STATUS, a.status, Unit::None);
    push(names::HEALTH_CHECK_FAILURES, a.failures, Unit::Count);
    push(
        names::SERVICE_RESTARTS,
        Some(Stats::one(a.restarts as f64)),
        Unit::Count,
    );
    push(names::RESPONSE_TIME, a.response_ms, Unit::Milliseconds);
    push(names::CERT_EXPIRY_DAYS, a.cert_days, Unit::None);
    push(names::CPU_PERCENT, a.cpu_pct, Unit::Percent);
    push(names::MEMORY_BYTES, a.memory, Unit::Bytes);
}

/// Every app's aggregates of one flush period, turned into datums: the app metrics with
/// dimensions App + InstanceId (+ Fleet in fleet mode), the heartbeat (and a non-zero drop count)
/// with InstanceId only; in fleet mode the heartbeat once more with Fleet alone.
pub fn encode(
    apps: &BTreeMap<String, AppAggregate>,
    instance_id: &str,
    fleet: Option<&str>,
    ts_ms: u64,
    dropped: u64,
    alive: bool,
) -> Vec<Datum> {
    let inst = || (names::DIM_INSTANCE_ID.to_string(), instance_id.to_string());
    let mut out = Vec::with_capacity(apps.len() * 6 + 2);
    for (app, a) in apps {
        if !a.is_empty() {
            encode_app(&mut out, app, a, instance_id, fleet, ts_ms);
        }
    }
    // Only while the daemon's watch loop is on schedule: a wedged agent must look dead.
    if alive {
        out.push(Datum {
            name: names::AGENT_HEARTBEAT.to_string(),
            dims: vec![inst()],
            ts_ms,
            stats: Stats::one(1.0),
            unit: Unit::Count,
        });
        if let Some(f) = fleet {
            out.push(Datum {
                name: names::AGENT_HEARTBEAT.to_string(),
                dims: vec![(names::DIM_FLEET.to_string(), f.to_string())],
                ts_ms,
                stats: Stats::one(1.0),
                unit: Unit::Count,
            });
        }
    }
    if dropped > 0 {
        out.push(Datum {
            name: names::DROPPED_DATAPOINTS.to_string(),
            dims: vec![inst()],
            ts_ms,
            stats: Stats::one(dropped as f64),
            unit: Unit::Count,
        });
    }
    out
}

/// How many datums from the front of `queue` fit in one PutMetricData request (at least one,
/// when the queue is not empty, so a queue always makes progress).
pub fn next_request_len<'a>(queue: impl IntoIterator<Item = &'a Datum>) -> usize {
    let mut n = 0;
    let mut bytes = 0;
    for d in queue {
        let size = d.size_estimate();
        if n == MAX_DATUMS_PER_REQUEST || (n > 0 && bytes + size > MAX_REQUEST_BYTES) {
            break;
        }
        n += 1;
        bytes += size;
    }
    n
}

/// Splits datums into requests, in order, each within AWS's limits.
pub fn split(datums: &[Datum]) -> Vec<&[Datum]> {
    let mut out = Vec::new();
    let mut rest = datums;
    while !rest.is_empty() {
        let n = next_request_len(rest);
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datum(app: &str, name_len: usize) -> Datum {
        Datum {
            name: "M".repeat(name_len),
            dims: vec![
                ("App".into(), app.into()),
                ("InstanceId".into(), "i-0123456789abcdef0".into()),
            ],
            ts_ms: 1_795_873_501_000,
            stats: Stats::one(1.0),
            unit: Unit::Count,
        }
    }

    #[test]
    fn dimension_values_aws_refuses_are_caught_before_sending() {
        for app in ["café", "   ", "web\u{7}", "应用"] {
            assert_eq!(datum(app, 5).invalid(), Some(DIMENSION_RULE), "{app:?}");
        }
        assert_eq!(datum("web-1 (blue)", 5).invalid(), None);
    }

    #[test]
    fn aggregates_samples_per_flush() {
        let mut a = AppAggregate::default();
        for (ok, ms) in [(true, 12.0), (false, 5000.0), (true, 8.0)] {
            a.record(&CheckSample {
                healthy: ok,
                response_ms: Some(ms),
                cert_days: None,
                cpu_pct: Some(ms / 100.0),
                memory_bytes: Some(1e6),
            });
        }
        a.record(&CheckSample {
            healthy: true,
            response_ms: Some(f64::NAN),
            cert_days: None,
            ..Default::default()
        });
        a.restarts = 2;
        assert_eq!(
            a.status,
            Some(Stats {
                count: 4.0,
                sum: 3.0,
                min: 0.0,
                max: 1.0
            })
        );
        assert_eq!(a.failures.unwrap().sum, 1.0);
        assert_eq!(
            a.response_ms,
            Some(Stats {
                count: 3.0,
                sum: 5020.0,
                min: 8.0,
                max: 5000.0
            })
        );
        assert_eq!(a.memory.unwrap().count, 3.0);
        let apps = BTreeMap::from([
            ("web".to_string(), a),
            ("idle".to_string(), AppAggregate::default()),
        ]);
        let d = encode(&apps, "i-1", None, 1000, 0, true);
        let names: Vec<&str> = d.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ServiceStatus",
                "HealthCheckFailures",
                "ServiceRestarts",
                "ResponseTime",
                "CpuPercent",
                "MemoryBytes",
                "AgentHeartbeat"
            ]
        );
        assert_eq!(d[2].stats.sum, 2.0);
        assert_eq!(
            d[0].dims,
            [
                ("App".to_string(), "web".to_string()),
                ("InstanceId".to_string(), "i-1".to_string())
            ]
        );
        assert_eq!(d[6].dims, [("InstanceId".to_string(), "i-1".to_string())]);
        assert!(d.iter().all(|d| d.invalid().is_none()));
        let d = encode(&BTreeMap::new(), "i-1", None, 1000, 7, true);
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[1].name.as_str(), d[1].stats.sum),
            ("DroppedDatapoints", 7.0)
        );
    }

    #[test]
    fn a_fleet_agent_tags_app_metrics_with_the_fleet_and_counts_itself_in_it() {
        let mut a = AppAggregate::default();
        a.record(&CheckSample {
            healthy: false,
            ..Default::default()
        });
        let apps = BTreeMap::from([("web".to_string(), a)]);
        let d = encode(&apps, "i-1", Some("prod"), 1000, 0, true);
        let s = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            d[0].dims,
            [s("App", "web"), s("Fleet", "prod"), s("InstanceId", "i-1")]
        );
        let beats: Vec<_> = d.iter().filter(|d| d.name == "AgentHeartbeat").collect();
        assert_eq!(beats.len(), 2);
        assert_eq!(beats[0].dims, [s("InstanceId", "i-1")]);
        assert_eq!(beats[1].dims, [s("Fleet", "prod")]);
        // A wedged agent sends neither heartbeat.
        let d = encode(&apps, "i-1", Some("prod"), 1000, 0, false);
        assert!(d.iter().all(|d| d.name != "AgentHeartbeat"));
    }

    #[test]
    fn splits_at_1000_datums() {
        let q: Vec<Datum> = (0..2500).map(|i| datum(&format!("app{i}"), 12)).collect();
        let parts = split(&q);
        let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        assert_eq!(lens, [1000, 1000, 500]);
        assert_eq!(parts[1][0], q[1000], "order is kept");
        assert_eq!(split(&q[..1000]).len(), 1);
        assert_eq!(split(&q[..1001]).len(), 2);
        assert!(split(&[]).is_empty());
    }

    #[test]
    fn splits_at_one_megabyte() {
        // 255-character names and 1024-character dimension values: about 2.5 KB per datum.
        let big = Datum {
            name: "N".repeat(255),
            dims: (0..2)
                .map(|i| (format!("D{i}"), "v".repeat(1024)))
                .collect(),
            ..datum("a", 1)
        };
        let q = vec![big.clone(); 1000];
        let parts = split(&q);
        assert!(parts.len() >= 3, "{} parts", parts.len());
        for p in &parts {
            let bytes: usize = p.iter().map(Datum::size_estimate).sum();
            assert!(bytes <= MAX_REQUEST_BYTES && p.len() <= MAX_DATUMS_PER_REQUEST);
        }
        assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), 1000);
    }

    #[test]
    fn refuses_what_aws_refuses() {
        let mut d = datum("a", 5);
        d.dims = (0..31).map(|i| (format!("D{i}"), "v".into())).collect();
        assert_eq!(d.invalid(), Some("more than 30 dimensions"));
        d.dims.truncate(30);
        assert_eq!(d.invalid(), None);
        d.stats.sum = f64::INFINITY;
        assert!(d.invalid().is_some());
        let mut d = datum("a", 256);
        assert!(d.invalid().is_some());
        d.name = "ok".into();
        d.stats.count = 0.0;
        assert!(d.invalid().is_some());
        // StatisticValues only: the 150-values limit cannot be reached by construction
        // (`sink::tests::sdk_datum_carries_statistics_and_resolution` checks no Values are set).
    }
}
