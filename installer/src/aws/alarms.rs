//! The CloudWatch alarms provision-aws keeps in single-box mode: the seed's three per app and a
//! heartbeat per instance, as plain values; their validation against AWS's limits (which the test
//! stand-in does not enforce); and the field-by-field comparison that decides whether an alarm is
//! rewritten. Fleet mode's alarms (`fleet.rs`) are the same `AlarmSpec` with metric queries.
//!
//! Ownership in single-box mode is the name prefix *and* the `InstanceId` dimension: instance
//! `web` never claims `web-2`'s alarms although `pmguard-web-` is a prefix of them.

use pmguard_agent::aws::names::{
    AGENT_HEARTBEAT, DIM_APP, DIM_INSTANCE_ID, HEALTH_CHECK_FAILURES, SERVICE_RESTARTS,
    SERVICE_STATUS,
};
use pmguard_agent::config::Config;

use crate::iam::NAME_PREFIX;

/// What an alarm compares; the subset of PutMetricAlarm pmguard sets.
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmSpec {
    pub name: String,
    pub description: String,
    pub namespace: String,
    pub metric: String,
    pub statistic: String,
    pub dimensions: Vec<(String, String)>,
    pub period: i32,
    pub evaluation_periods: i32,
    pub datapoints_to_alarm: i32,
    pub threshold: f64,
    pub comparison: String,
    pub treat_missing_data: String,
    pub actions: Vec<String>,
    /// Metric data queries (a Metrics Insights query, or metric math); empty for an alarm on one
    /// metric (then `namespace`, `metric`, `statistic`, `dimensions` and `period` apply).
    pub metrics: Vec<MetricQuery>,
}

/// One entry of PutMetricAlarm's `Metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricQuery {
    pub id: String,
    pub label: String,
    pub period: i32,
    pub return_data: bool,
    pub source: QuerySource,
}

#[derive(Debug, Clone, PartialEq)]
pub enum QuerySource {
    /// A Metrics Insights query (`SELECT ...`) or a math expression over other ids.
    Expression(String),
    /// One metric: namespace, name, dimensions, statistic.
    Metric {
        namespace: String,
        name: String,
        dimensions: Vec<(String, String)>,
        stat: String,
    },
}

/// Whether an observed alarm is this instance's: exactly its `InstanceId` dimension.
pub fn owned_by_instance(spec: &AlarmSpec, instance: &str) -> bool {
    spec.dimensions
        .iter()
        .any(|(k, v)| k == DIM_INSTANCE_ID && v == instance)
}

/// Alarm thresholds (the seed's alarms by default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Service-Down: ServiceStatus below 1 for this many minutes.
    pub down_minutes: i32,
    /// High-Error-Rate: more than this many failed checks in 5 minutes.
    pub failures_per_5m: f64,
    /// Frequent-Restarts: more than this many restarts in 15 minutes.
    pub restarts_per_15m: f64,
}

impl Thresholds {
    pub fn from_config(config: &Config) -> Thresholds {
        let a = config.aws.as_ref();
        Thresholds {
            down_minutes: a.map_or(10, |a| a.alarm_down_minutes as i32),
            failures_per_5m: a.map_or(3.0, |a| a.alarm_failures as f64),
            restarts_per_15m: a.map_or(2.0, |a| a.alarm_restarts as f64),
        }
    }
}

/// The alarm name prefix of one instance: everything provision-aws may delete for it.
pub fn instance_prefix(instance: &str) -> String {
    format!("{NAME_PREFIX}{instance}-")
}

/// Every alarm the config asks for on this instance, in a stable order.
pub fn desired(config: &Config, instance: &str, topic_arn: Option<&str>) -> Vec<AlarmSpec> {
    let Some(aws) = config.aws.as_ref() else {
        return Vec::new();
    };
    let t = Thresholds::from_config(config);
    let actions: Vec<String> = topic_arn.map(|a| vec![a.to_string()]).unwrap_or_default();
    let mut out = Vec::new();
    for app in &config.apps {
        out.extend(app_alarms(&aws.namespace, app, instance, &t, &actions));
    }
    out.push(heartbeat_alarm(&aws.namespace, instance, actions));
    out
}

/// One app's alarms on this instance: down, failing checks, restarting often.
fn app_alarms(
    namespace: &str,
    app: &pmguard_agent::config::AppConfig,
    instance: &str,
    t: &Thresholds,
    actions: &[String],
) -> [AlarmSpec; 3] {
    let base = |suffix: &str, description: String, metric: &str| AlarmSpec {
        name: format!("{}{}-{suffix}", instance_prefix(instance), app.name),
        description,
        metric: metric.to_string(),
        ..app_alarm_base(namespace, &app.name, instance, actions)
    };
    [
        AlarmSpec {
            statistic: "Maximum".into(),
            evaluation_periods: t.down_minutes,
            datapoints_to_alarm: t.down_minutes,
            threshold: 1.0,
            comparison: "LessThanThreshold".into(),
            // No data means the agent or the box is gone: that is down too.
            treat_missing_data: "breaching".into(),
            ..base(
                "service-down",
                format!("{} on {instance}: no passing check for {} minutes (or no data). Managed by pmguard.", app.name, t.down_minutes),
                SERVICE_STATUS,
            )
        },
        AlarmSpec {
            statistic: "Sum".into(),
            period: 300,
            threshold: t.failures_per_5m,
            comparison: "GreaterThanThreshold".into(),
            treat_missing_data: "notBreaching".into(),
            ..base(
                "high-error-rate",
                format!("{} on {instance}: more than {} failed checks in 5 minutes. Managed by pmguard.", app.name, t.failures_per_5m),
                HEALTH_CHECK_FAILURES,
            )
        },
        AlarmSpec {
            statistic: "Sum".into(),
            period: 900,
            threshold: t.restarts_per_15m,
            comparison: "GreaterThanThreshold".into(),
            treat_missing_data: "notBreaching".into(),
            ..base(
                "frequent-restarts",
                format!(
                    "{} on {instance}: more than {} restarts in 15 minutes. Managed by pmguard.",
                    app.name, t.restarts_per_15m
                ),
                SERVICE_RESTARTS,
            )
        },
    ]
}

/// What every alarm of one app on one instance shares: its namespace, dimensions and actions.
fn app_alarm_base(namespace: &str, app: &str, instance: &str, actions: &[String]) -> AlarmSpec {
    AlarmSpec {
        name: String::new(),
        description: String::new(),
        namespace: namespace.to_string(),
        metric: String::new(),
        statistic: String::new(),
        dimensions: vec![
            (DIM_APP.to_string(), app.to_string()),
            (DIM_INSTANCE_ID.to_string(), instance.to_string()),
        ],
        period: 60,
        evaluation_periods: 1,
        datapoints_to_alarm: 1,
        threshold: 0.0,
        comparison: String::new(),
        treat_missing_data: String::new(),
        actions: actions.to_vec(),
        metrics: Vec::new(),
    }
}

/// The agent's own alarm on this instance: no heartbeat for 5 minutes.
fn heartbeat_alarm(namespace: &str, instance: &str, actions: Vec<String>) -> AlarmSpec {
    let prefix = instance_prefix(instance);
    no_heartbeat(
        format!("{prefix}agent-heartbeat"),
        format!("pmguard-agent on {instance} sent no heartbeat for 5 minutes. Managed by pmguard."),
        namespace,
        (DIM_INSTANCE_ID.to_string(), instance.to_string()),
        300,
        actions,
    )
}

/// An alarm on heartbeats missing for one `period` under `dimension`: missing data breaches.
pub(crate) fn no_heartbeat(
    name: String,
    description: String,
    namespace: &str,
    dimension: (String, String),
    period: i32,
    actions: Vec<String>,
) -> AlarmSpec {
    AlarmSpec {
        name,
        description,
        namespace: namespace.to_string(),
        metric: AGENT_HEARTBEAT.into(),
        statistic: "SampleCount".into(),
        dimensions: vec![dimension],
        period,
        evaluation_periods: 1,
        datapoints_to_alarm: 1,
        threshold: 1.0,
        comparison: "LessThanThreshold".into(),
        treat_missing_data: "breaching".into(),
        actions,
        metrics: Vec::new(),
    }
}

const TREAT_MISSING: &[&str] = &["breaching", "notBreaching", "ignore", "missing"];
const COMPARISONS: &[&str] = &[
    "GreaterThanOrEqualToThreshold",
    "GreaterThanThreshold",
    "LessThanThreshold",
    "LessThanOrEqualToThreshold",
];
const STATISTICS: &[&str] = &["SampleCount", "Average", "Sum", "Minimum", "Maximum"];

/// AWS's PutMetricAlarm rules that matter here (the stand-in accepts anything).
pub fn validate(a: &AlarmSpec) -> Result<(), crate::Error> {
    let fail = |why: String| {
        Err(crate::Error::Alarm {
            alarm: a.name.clone(),
            why,
        })
    };
    if a.name.is_empty() || a.name.chars().count() > 255 {
        return fail("names are 1 to 255 characters".into());
    }
    if a.description.chars().count() > 1024 {
        return fail("descriptions are at most 1024 characters".into());
    }
    if !(a.period == 10
        || a.period == 20
        || a.period == 30
        || (a.period >= 60 && a.period % 60 == 0))
    {
        return fail(format!(
            "period {} must be 10, 20, 30 or a multiple of 60",
            a.period
        ));
    }
    if a.evaluation_periods < 1 || a.period as i64 * a.evaluation_periods as i64 > 86_400 * 7 {
        return fail(
            "evaluation periods x period must be at least one period and at most 7 days".into(),
        );
    }
    if a.datapoints_to_alarm < 1 || a.datapoints_to_alarm > a.evaluation_periods {
        return fail("datapoints to alarm must be 1..=evaluation periods".into());
    }
    if !TREAT_MISSING.contains(&a.treat_missing_data.as_str()) {
        return fail(format!(
            "TreatMissingData `{}` must be one of {}",
            a.treat_missing_data,
            TREAT_MISSING.join(", ")
        ));
    }
    if !COMPARISONS.contains(&a.comparison.as_str()) {
        return fail(format!(
            "comparison `{}` is not one CloudWatch knows",
            a.comparison
        ));
    }
    if a.metrics.is_empty() && !STATISTICS.contains(&a.statistic.as_str()) {
        return fail(format!(
            "statistic `{}` is not one CloudWatch knows",
            a.statistic
        ));
    }
    if a.dimensions.len() > 30 {
        return fail("at most 30 dimensions".into());
    }
    if a.actions.len() > 5 {
        return fail("at most 5 actions".into());
    }
    if a.namespace.starts_with("AWS/") {
        return fail("custom metrics cannot use an AWS/ namespace".into());
    }
    Ok(())
}

/// The fields that differ, as `field: old -> new` lines (empty = identical).
pub fn diff(old: &AlarmSpec, new: &AlarmSpec) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{name}: {a} -> {b}"));
        }
    };
    field(
        "description",
        old.description.clone(),
        new.description.clone(),
    );
    if new.metrics.is_empty() {
        field("namespace", old.namespace.clone(), new.namespace.clone());
        field("metric", old.metric.clone(), new.metric.clone());
        field("statistic", old.statistic.clone(), new.statistic.clone());
        let mut od = old.dimensions.clone();
        let mut nd = new.dimensions.clone();
        od.sort();
        nd.sort();
        field("dimensions", format!("{od:?}"), format!("{nd:?}"));
        field("period", old.period.to_string(), new.period.to_string());
    } else if !old.metrics.is_empty() {
        // AWS returns the queries; the stand-in drops them, and then the spec hash in the
        // description (compared above) stands for them.
        field(
            "metrics",
            format!("{:?}", old.metrics),
            format!("{:?}", new.metrics),
        );
    }
    field(
        "evaluation_periods",
        old.evaluation_periods.to_string(),
        new.evaluation_periods.to_string(),
    );
    field(
        "datapoints_to_alarm",
        old.datapoints_to_alarm.to_string(),
        new.datapoints_to_alarm.to_string(),
    );
    field(
        "threshold",
        old.threshold.to_string(),
        new.threshold.to_string(),
    );
    field("comparison", old.comparison.clone(), new.comparison.clone());
    field(
        "treat_missing_data",
        old.treat_missing_data.clone(),
        new.treat_missing_data.clone(),
    );
    field(
        "actions",
        format!("{:?}", old.actions),
        format!("{:?}", new.actions),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> Config {
        Config::parse(
            Path::new("/c.toml"),
            &format!("[[apps]]\nname = \"codebox\"\n[[apps]]\nname = \"worker\"\n[aws]\nsns_topic = \"alerts\"\n{extra}"),
        )
        .unwrap()
    }

    #[test]
    fn the_seed_alarms_per_app_and_a_heartbeat() {
        let a = desired(
            &config(""),
            "i-0abc",
            Some("arn:aws:sns:us-east-1:1:alerts"),
        );
        let names: Vec<&str> = a.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "pmguard-i-0abc-codebox-service-down",
                "pmguard-i-0abc-codebox-high-error-rate",
                "pmguard-i-0abc-codebox-frequent-restarts",
                "pmguard-i-0abc-worker-service-down",
                "pmguard-i-0abc-worker-high-error-rate",
                "pmguard-i-0abc-worker-frequent-restarts",
                "pmguard-i-0abc-agent-heartbeat",
            ]
        );
        let down = &a[0];
        assert_eq!(
            (down.period, down.evaluation_periods, down.threshold),
            (60, 10, 1.0)
        );
        assert_eq!(down.treat_missing_data, "breaching");
        assert_eq!(a[1].period, 300);
        assert_eq!(a[1].threshold, 3.0);
        assert_eq!(a[2].period, 900);
        assert_eq!(a[2].threshold, 2.0);
        assert_eq!(a[6].treat_missing_data, "breaching");
        for x in &a {
            validate(x).unwrap();
            assert_eq!(x.actions, ["arn:aws:sns:us-east-1:1:alerts"]);
        }
    }

    #[test]
    fn limits_the_stand_in_does_not_enforce() {
        let base = desired(&config(""), "i-1", None).remove(0);
        for p in [10, 20, 30, 60, 120, 3600] {
            validate(&AlarmSpec {
                period: p,
                evaluation_periods: 1,
                datapoints_to_alarm: 1,
                ..base.clone()
            })
            .unwrap();
        }
        for p in [0, 5, 45, 90, 61] {
            let e = validate(&AlarmSpec {
                period: p,
                ..base.clone()
            })
            .unwrap_err()
            .to_string();
            assert!(e.contains("multiple of 60"), "{e}");
        }
        assert!(validate(&AlarmSpec {
            treat_missing_data: "Breaching".into(),
            ..base.clone()
        })
        .unwrap_err()
        .to_string()
        .contains("TreatMissingData"));
        assert!(validate(&AlarmSpec {
            name: "x".repeat(256),
            ..base.clone()
        })
        .unwrap_err()
        .to_string()
        .contains("255"));
        validate(&AlarmSpec {
            name: "x".repeat(255),
            ..base.clone()
        })
        .unwrap();
        assert!(validate(&AlarmSpec {
            datapoints_to_alarm: 11,
            ..base.clone()
        })
        .is_err());
        assert!(validate(&AlarmSpec {
            evaluation_periods: 10081,
            period: 60,
            datapoints_to_alarm: 1,
            ..base.clone()
        })
        .is_err());
    }

    #[test]
    fn an_instance_owns_exactly_its_alarms_not_a_longer_name() {
        let web = desired(&config(""), "web", None);
        let web2 = desired(&config(""), "web-2", None);
        assert!(web2[0].name.starts_with(&instance_prefix("web")));
        assert!(web.iter().all(|a| owned_by_instance(a, "web")));
        assert!(web2.iter().all(|a| !owned_by_instance(a, "web")));
    }

    #[test]
    fn diff_names_each_changed_field() {
        let a = desired(&config(""), "i-1", None);
        let b = desired(&config("alarm_failures = 5\n"), "i-1", None);
        assert!(diff(&a[0], &b[0]).is_empty());
        let d = diff(&a[1], &b[1]);
        assert!(d.iter().any(|l| l == "threshold: 3 -> 5"), "{d:?}");
    }
}
