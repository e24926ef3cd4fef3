//! Fleet mode's alarms (`[aws] fleet`): one set per app for the whole fleet, not one per instance.
//!
//! - Per app, three CloudWatch Metrics Insights alarms (`... GROUP BY InstanceId`): every instance
//!   that reports is a contributor, a new instance is covered the moment it reports, a terminated
//!   one stops being a contributor. Missing data is `notBreaching`: an instance that is gone is not
//!   "down" (scale-in raises nothing).
//! - Per fleet, one alarm for an agent or a box that dies while its instance is still in service:
//!   with `auto_scaling_group`, metric math compares `AWS/AutoScaling GroupInServiceInstances`
//!   with the number of instances sending `AgentHeartbeat{Fleet}`; without it, a heartbeat
//!   dead-man's switch for the whole fleet (no instance reporting at all).
//!
//! Invariants:
//! - Ownership is exact: an alarm is the fleet's when its description carries the marker
//!   `[pmguard fleet=<name> spec=<hash>]` with exactly this fleet's name (never a name prefix:
//!   fleet `web` does not own `web-2`'s alarms).
//! - The marker's hash covers every field but the actions (the topic's ARN may not be known when
//!   planning), so an alarm whose queries the stand-in dropped still compares equal when nothing
//!   changed, and differs when anything did.
//! - Every definition is checked against AWS's documented limits before a call is made (the
//!   stand-in enforces none of them): `validate_fleet`.

use std::fmt::Write as _;

use pmguard_agent::aws::names::{
    AGENT_HEARTBEAT, DIM_APP, DIM_FLEET, DIM_INSTANCE_ID, HEALTH_CHECK_FAILURES, SERVICE_RESTARTS,
    SERVICE_STATUS,
};
use pmguard_agent::config::{AwsConfig, Config};
use sha2::{Digest, Sha256};

use super::alarms::{self, AlarmSpec, MetricQuery, QuerySource, Thresholds};
use crate::iam::NAME_PREFIX;

/// Metrics Insights alarms allowed per account and Region (AWS default quota).
pub const MAX_INSIGHTS_ALARMS: usize = 200;
/// Time series one Metrics Insights query returns at most (beyond: PARTIAL_DATA).
pub const MAX_QUERY_SERIES: usize = 500;
/// Metrics a metric-math alarm may reference.
pub const MAX_MATH_METRICS: usize = 10;
/// Longest `Expression` of a metric data query.
pub const MAX_EXPRESSION_CHARS: usize = 2048;

/// The name prefix of the fleet's alarms (a search key only; ownership is the marker).
pub fn alarm_prefix(fleet: &str) -> String {
    format!("{NAME_PREFIX}fleet-{fleet}-")
}

pub fn dashboard_name(fleet: &str) -> String {
    format!("{NAME_PREFIX}fleet-{fleet}")
}

/// The name of the fleet-level alarm for dead agents on in-service instances.
pub fn agents_alarm_name(fleet: &str, with_asg: bool) -> String {
    if with_asg {
        format!("{}agents-missing", alarm_prefix(fleet))
    } else {
        format!("{}no-agent-reporting", alarm_prefix(fleet))
    }
}

/// The ownership marker at the end of a fleet alarm's description.
fn marker(fleet: &str, hash: &str) -> String {
    format!("[pmguard fleet={fleet} spec={hash}]")
}

/// The fleet named in a description's marker, if it has one.
pub fn marker_fleet(description: &str) -> Option<&str> {
    let start = description.rfind("[pmguard fleet=")?;
    let rest = description[start + "[pmguard fleet=".len()..].strip_suffix(']')?;
    let (fleet, spec) = rest.split_once(" spec=")?;
    (!fleet.is_empty() && spec.len() == 16 && spec.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(fleet)
}

/// Whether an observed alarm is this fleet's (exactly).
pub fn owned_by_fleet(spec: &AlarmSpec, fleet: &str) -> bool {
    marker_fleet(&spec.description) == Some(fleet)
}

/// Seals a spec: appends the marker with the hash of every field but the actions.
fn seal(mut spec: AlarmSpec, fleet: &str) -> AlarmSpec {
    let mut h = Sha256::new();
    let unsealed = AlarmSpec {
        actions: Vec::new(),
        ..spec.clone()
    };
    h.update(format!("{unsealed:?}").as_bytes());
    let hash: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let _ = write!(spec.description, " {}", marker(fleet, &hash));
    spec
}

/// A Metrics Insights string literal; app names with a quote or backslash are refused earlier.
fn quoted(s: &str) -> String {
    format!("'{s}'")
}

/// `SELECT <f>(<metric>) FROM SCHEMA(...) WHERE Fleet = .. AND App = .. GROUP BY InstanceId ...`
pub fn insights_query(aws: &AwsConfig, fleet: &str, app: &str, func: &str, metric: &str) -> String {
    let order = if func == "MAX" || func == "MIN" {
        "ASC"
    } else {
        "DESC"
    };
    format!(
        "SELECT {func}({metric}) FROM SCHEMA(\"{ns}\", {DIM_APP}, {DIM_FLEET}, {DIM_INSTANCE_ID}) WHERE {DIM_FLEET} = {f} AND {DIM_APP} = {a} GROUP BY {DIM_INSTANCE_ID} ORDER BY {func}() {order} LIMIT {MAX_QUERY_SERIES}",
        ns = aws.namespace,
        f = quoted(fleet),
        a = quoted(app),
    )
}

/// The heartbeat period: at least 5 minutes and at least two flushes, a multiple of 60 s.
pub fn heartbeat_period(aws: &AwsConfig) -> i32 {
    let two_flushes = 2 * aws.flush_interval.as_secs().max(1) as i32;
    ((two_flushes + 59) / 60 * 60).max(300)
}

/// Every alarm the fleet needs, sealed, in a stable order.
pub fn desired(config: &Config, topic_arn: Option<&str>) -> Vec<AlarmSpec> {
    let Some(aws) = config.aws.as_ref() else {
        return Vec::new();
    };
    let Some(fleet) = aws.fleet.as_deref() else {
        return Vec::new();
    };
    let t = Thresholds::from_config(config);
    let actions: Vec<String> = topic_arn.map(|a| vec![a.to_string()]).unwrap_or_default();
    let mut out = Vec::new();
    for app in &config.apps {
        out.extend(app_alarms(aws, fleet, &app.name, &t, &actions));
    }
    out.push(agents_alarm(aws, fleet, actions));
    out.into_iter().map(|a| seal(a, fleet)).collect()
}

/// One app's three alarms across the fleet: down, failing checks, restarting often.
fn app_alarms(
    aws: &AwsConfig,
    fleet: &str,
    app: &str,
    t: &Thresholds,
    actions: &[String],
) -> [AlarmSpec; 3] {
    let insight = |suffix: &str, what: String, func: &str, metric: &str, period: i32| {
        insights_alarm(
            aws,
            fleet,
            app,
            actions,
            Insight {
                suffix,
                what,
                func,
                metric,
                period,
            },
        )
    };
    [
        AlarmSpec {
            evaluation_periods: t.down_minutes,
            datapoints_to_alarm: t.down_minutes,
            threshold: 1.0,
            comparison: "LessThanThreshold".into(),
            ..insight(
                "service-down",
                format!("no passing check for {} minutes", t.down_minutes),
                "MAX",
                SERVICE_STATUS,
                60,
            )
        },
        AlarmSpec {
            threshold: t.failures_per_5m,
            comparison: "GreaterThanThreshold".into(),
            ..insight(
                "high-error-rate",
                format!("more than {} failed checks in 5 minutes", t.failures_per_5m),
                "SUM",
                HEALTH_CHECK_FAILURES,
                300,
            )
        },
        AlarmSpec {
            threshold: t.restarts_per_15m,
            comparison: "GreaterThanThreshold".into(),
            ..insight(
                "frequent-restarts",
                format!("more than {} restarts in 15 minutes", t.restarts_per_15m),
                "SUM",
                SERVICE_RESTARTS,
                900,
            )
        },
    ]
}

/// What one app's Metrics Insights alarm watches: `func(metric)` per instance over `period`.
struct Insight<'a> {
    suffix: &'a str,
    what: String,
    func: &'a str,
    metric: &'a str,
    period: i32,
}

/// One app's Metrics Insights alarm across the fleet (threshold and comparison left to the
/// caller): each instance where it happens is a contributor.
fn insights_alarm(
    aws: &AwsConfig,
    fleet: &str,
    app: &str,
    actions: &[String],
    i: Insight<'_>,
) -> AlarmSpec {
    let Insight {
        suffix,
        what,
        func,
        metric,
        period,
    } = i;
    AlarmSpec {
        name: format!("{}{app}-{suffix}", alarm_prefix(fleet)),
        description: format!("{app} in fleet {fleet}: {what}; each instance where it happens is a contributor. Managed by pmguard."),
        namespace: String::new(),
        metric: String::new(),
        statistic: String::new(),
        dimensions: Vec::new(),
        period,
        evaluation_periods: 1,
        datapoints_to_alarm: 1,
        threshold: 0.0,
        comparison: String::new(),
        // A contributor that stops reporting is an instance that is gone (scale-in), or
        // one whose agent died: the fleet's heartbeat alarm catches the latter.
        treat_missing_data: "notBreaching".into(),
        actions: actions.to_vec(),
        metrics: vec![MetricQuery {
            id: "q1".into(),
            label: format!("{app} {metric} by instance"),
            period,
            return_data: true,
            source: QuerySource::Expression(insights_query(aws, fleet, app, func, metric)),
        }],
    }
}

/// The alarm for agents (or boxes) that died while their instance is in service.
fn agents_alarm(aws: &AwsConfig, fleet: &str, actions: Vec<String>) -> AlarmSpec {
    match &aws.auto_scaling_group {
        Some(asg) => in_service_without_heartbeat_alarm(aws, fleet, asg, actions),
        None => no_heartbeat_alarm(aws, fleet, actions),
    }
}

/// With an Auto Scaling group: in-service instances minus those sending a heartbeat, so one
/// dead agent among live ones is caught.
fn in_service_without_heartbeat_alarm(
    aws: &AwsConfig,
    fleet: &str,
    asg: &str,
    actions: Vec<String>,
) -> AlarmSpec {
    let period = heartbeat_period(aws);
    let per_instance = period as f64 / aws.flush_interval.as_secs().max(1) as f64;
    let beats = QuerySource::Metric {
        namespace: aws.namespace.clone(),
        name: AGENT_HEARTBEAT.into(),
        dimensions: vec![(DIM_FLEET.into(), fleet.into())],
        stat: "SampleCount".into(),
    };
    AlarmSpec {
        name: agents_alarm_name(fleet, true),
        description: format!(
            "Fleet {fleet}: fewer instances send a pmguard heartbeat than Auto Scaling group {asg} has in service, for two periods of {} minutes (an agent or a box died while in service). No data means the group's metrics collection is off or the group is gone. Managed by pmguard.",
            period / 60
        ),
        namespace: String::new(),
        metric: String::new(),
        statistic: String::new(),
        dimensions: Vec::new(),
        period,
        evaluation_periods: 2,
        datapoints_to_alarm: 2,
        threshold: 0.5,
        comparison: "GreaterThanOrEqualToThreshold".into(),
        treat_missing_data: "breaching".into(),
        actions,
        metrics: vec![
            MetricQuery {
                id: "inservice".into(),
                label: format!("{asg} in service"),
                period,
                return_data: false,
                source: QuerySource::Metric {
                    namespace: "AWS/AutoScaling".into(),
                    name: "GroupInServiceInstances".into(),
                    dimensions: vec![("AutoScalingGroupName".into(), asg.to_string())],
                    stat: "Minimum".into(),
                },
            },
            MetricQuery {
                id: "beats".into(),
                label: format!("heartbeats from fleet {fleet}"),
                period,
                return_data: false,
                source: beats,
            },
            MetricQuery {
                id: "missing".into(),
                label: "in-service instances without a heartbeat".into(),
                period,
                return_data: true,
                source: QuerySource::Expression(format!(
                    "inservice - FILL(beats, 0) / {per_instance}"
                )),
            },
        ],
    }
}

/// Without an Auto Scaling group: no heartbeat from any instance of the fleet.
fn no_heartbeat_alarm(aws: &AwsConfig, fleet: &str, actions: Vec<String>) -> AlarmSpec {
    let period = heartbeat_period(aws);
    super::alarms::no_heartbeat(
        agents_alarm_name(fleet, false),
        format!(
            "Fleet {fleet}: no instance sent a pmguard heartbeat for {} minutes (the whole fleet or every agent is down). Set [aws] auto_scaling_group to also catch one dead agent among live ones. Managed by pmguard.",
            period / 60
        ),
        &aws.namespace,
        (DIM_FLEET.into(), fleet.into()),
        period,
        actions,
    )
}

/// Whether an alarm is a Metrics Insights alarm (counts against the 200 per account and Region).
pub fn is_insights(spec: &AlarmSpec) -> bool {
    spec.metrics.iter().any(
        |q| matches!(&q.source, QuerySource::Expression(e) if e.trim_start().to_ascii_uppercase().starts_with("SELECT")),
    )
}

/// AWS's rules for alarms on metric data queries, which the stand-in does not enforce.
pub fn validate_queries(a: &AlarmSpec) -> Result<(), crate::Error> {
    validate_query_shape(a)?;
    if is_insights(a) {
        validate_insights(a)?;
    }
    Ok(())
}

/// The rules for any alarm on metric data queries: one query returns data, few metrics, one
/// period, well-formed ids, short expressions.
fn validate_query_shape(a: &AlarmSpec) -> Result<(), crate::Error> {
    let fail = |why: String| {
        Err(crate::Error::Alarm {
            alarm: a.name.clone(),
            why,
        })
    };
    if a.metrics.is_empty() {
        return Ok(());
    }
    let returned = a.metrics.iter().filter(|q| q.return_data).count();
    if returned != 1 {
        return fail(format!(
            "exactly one metric data query must return data, not {returned}"
        ));
    }
    let stats = a
        .metrics
        .iter()
        .filter(|q| matches!(q.source, QuerySource::Metric { .. }))
        .count();
    if stats > MAX_MATH_METRICS {
        return fail(format!(
            "a metric math alarm references at most {MAX_MATH_METRICS} metrics, not {stats}"
        ));
    }
    if a.metrics.iter().any(|q| q.period != a.metrics[0].period) {
        return fail("every metric of a math alarm must have the same period".into());
    }
    for q in &a.metrics {
        let id_ok = q.id.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && q.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && q.id.len() <= 255;
        if !id_ok {
            return fail(format!(
                "query id `{}` must start with a lowercase letter and hold only letters, digits and _",
                q.id
            ));
        }
        if let QuerySource::Expression(e) = &q.source {
            if e.chars().count() > MAX_EXPRESSION_CHARS {
                return fail(format!(
                    "expressions are at most {MAX_EXPRESSION_CHARS} characters"
                ));
            }
        }
    }
    Ok(())
}

/// The rules for a Metrics Insights alarm (one query over the latest 3 hours, choosing its
/// series with ORDER BY ... LIMIT).
fn validate_insights(a: &AlarmSpec) -> Result<(), crate::Error> {
    let fail = |why: String| {
        Err(crate::Error::Alarm {
            alarm: a.name.clone(),
            why,
        })
    };
    if a.metrics.len() != 1 {
        return fail("a Metrics Insights alarm has exactly one query".into());
    }
    let QuerySource::Expression(e) = &a.metrics[0].source else {
        return fail("a Metrics Insights alarm's query is an expression".into());
    };
    // Metrics Insights reads high-resolution data at 1-minute granularity.
    if a.period < 60 || a.period % 60 != 0 {
        return fail(format!(
            "a Metrics Insights alarm's period must be a multiple of 60, not {}",
            a.period
        ));
    }
    if !e.contains(" GROUP BY ") {
        return fail("a multi time series alarm's query needs GROUP BY".into());
    }
    match e.rsplit_once(" LIMIT ").map(|(_, n)| n.trim().parse::<usize>()) {
        Some(Ok(n)) if (1..=MAX_QUERY_SERIES).contains(&n) && e.contains(" ORDER BY ") => {}
        _ => {
            return fail(format!(
                "the query must choose its series with ORDER BY ... LIMIT 1..={MAX_QUERY_SERIES} (Metrics Insights returns at most {MAX_QUERY_SERIES})"
            ))
        }
    }
    // Hours of data evaluated: Metrics Insights alarms see only the latest 3 hours.
    if a.period as i64 * a.evaluation_periods as i64 > 3 * 3600 {
        return fail(
            "a Metrics Insights alarm evaluates at most the latest 3 hours (period x evaluation periods)"
                .into(),
        );
    }
    Ok(())
}

/// Checks the whole fleet's definitions: each alarm, the names used inside queries, and the
/// account-wide quota of Metrics Insights alarms given how many others already exist.
pub fn validate_fleet(
    config: &Config,
    alarms: &[AlarmSpec],
    other_insights_alarms: usize,
) -> Result<(), crate::Error> {
    for app in &config.apps {
        if app.name.contains(['\'', '\\', '"']) || app.name.chars().any(|c| c.is_control()) {
            return Err(crate::Error::QuotedAppName {
                app: app.name.clone(),
            });
        }
    }
    for a in alarms {
        alarms::validate(a)?;
        validate_queries(a)?;
    }
    let ours = alarms.iter().filter(|a| is_insights(a)).count();
    if ours + other_insights_alarms > MAX_INSIGHTS_ALARMS {
        return Err(crate::Error::InsightsQuota {
            ours,
            others: other_insights_alarms,
            max: MAX_INSIGHTS_ALARMS,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(apps: &[&str], extra: &str) -> Config {
        let mut t = String::new();
        for a in apps {
            t += &format!("[[apps]]\nname = \"{a}\"\n");
        }
        t += &format!("[aws]\nfleet = \"web\"\nalarm_email = \"ops@example.com\"\n{extra}");
        Config::parse(Path::new("/c.toml"), &t).unwrap()
    }

    #[test]
    fn one_set_of_alarms_per_app_for_the_whole_fleet() {
        let c = config(&["codebox", "worker"], "");
        let a = desired(&c, Some("arn:aws:sns:us-east-1:1:pmguard-web-alerts"));
        let names: Vec<&str> = a.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "pmguard-fleet-web-codebox-service-down",
                "pmguard-fleet-web-codebox-high-error-rate",
                "pmguard-fleet-web-codebox-frequent-restarts",
                "pmguard-fleet-web-worker-service-down",
                "pmguard-fleet-web-worker-high-error-rate",
                "pmguard-fleet-web-worker-frequent-restarts",
                "pmguard-fleet-web-no-agent-reporting",
            ]
        );
        validate_fleet(&c, &a, 0).unwrap();
        let QuerySource::Expression(q) = &a[0].metrics[0].source else {
            panic!()
        };
        assert_eq!(
            q,
            "SELECT MAX(ServiceStatus) FROM SCHEMA(\"PM2/CodeBox\", App, Fleet, InstanceId) WHERE Fleet = 'web' AND App = 'codebox' GROUP BY InstanceId ORDER BY MAX() ASC LIMIT 500"
        );
        assert_eq!((a[0].period, a[0].evaluation_periods), (60, 10));
        assert!(a[..6]
            .iter()
            .all(|x| x.treat_missing_data == "notBreaching" && is_insights(x)));
        assert_eq!(a[6].treat_missing_data, "breaching");
        assert_eq!(a[6].dimensions, [("Fleet".to_string(), "web".to_string())]);
        assert!(!is_insights(&a[6]));
        assert!(a.iter().all(|x| owned_by_fleet(x, "web")));
    }

    #[test]
    fn with_an_auto_scaling_group_missing_heartbeats_are_counted_against_in_service_instances() {
        let c = config(&["codebox"], "auto_scaling_group = \"web-asg\"\n");
        let a = desired(&c, None);
        let dead = a.last().unwrap();
        assert_eq!(dead.name, "pmguard-fleet-web-agents-missing");
        assert_eq!(dead.metrics.len(), 3);
        let QuerySource::Expression(e) = &dead.metrics[2].source else {
            panic!()
        };
        // 60 s flushes: each instance sends 5 heartbeats per 5-minute period.
        assert_eq!(e, "inservice - FILL(beats, 0) / 5");
        assert_eq!((dead.threshold, dead.evaluation_periods), (0.5, 2));
        assert_eq!(dead.treat_missing_data, "breaching");
        validate_fleet(&c, &a, 0).unwrap();
        assert_eq!(a.iter().filter(|x| is_insights(x)).count(), 3);
    }

    #[test]
    fn the_heartbeat_period_spans_two_flushes() {
        let p = |f: &str| {
            heartbeat_period(
                config(&["a"], &format!("flush_interval = \"{f}\"\n"))
                    .aws
                    .as_ref()
                    .unwrap(),
            )
        };
        assert_eq!(p("10s"), 300);
        assert_eq!(p("60s"), 300);
        assert_eq!(p("5m"), 600);
        assert_eq!(p("7m"), 840);
    }

    #[test]
    fn ownership_is_the_exact_fleet_name_never_a_prefix() {
        let web = desired(&config(&["a"], ""), None);
        let text = "[[apps]]\nname = \"a\"\n[aws]\nfleet = \"web-2\"\n";
        let web2 = desired(&Config::parse(Path::new("/c.toml"), text).unwrap(), None);
        assert!(web2[0].name.starts_with(&alarm_prefix("web")));
        assert!(web2.iter().all(|a| !owned_by_fleet(a, "web")));
        assert!(web2.iter().all(|a| owned_by_fleet(a, "web-2")));
        assert!(web.iter().all(|a| !owned_by_fleet(a, "web-2")));
        assert_eq!(marker_fleet("someone's alarm"), None);
        assert_eq!(marker_fleet("x [pmguard fleet=web spec=zz]"), None);
    }

    #[test]
    fn the_spec_hash_changes_with_any_field_but_not_with_the_topic() {
        let a = desired(&config(&["a"], ""), None);
        let b = desired(&config(&["a"], ""), Some("arn:aws:sns:us-east-1:1:t"));
        let c = desired(&config(&["a"], "alarm_failures = 9\n"), None);
        assert_eq!(a[0].description, b[0].description);
        assert_eq!(a[1].description.len(), c[1].description.len());
        assert_ne!(a[1].description, c[1].description);
        // The stand-in drops the queries: what it returns still compares equal.
        let observed = AlarmSpec {
            metrics: Vec::new(),
            statistic: "Average".into(),
            ..b[0].clone()
        };
        assert!(alarms::diff(&observed, &b[0]).is_empty());
        let observed = AlarmSpec {
            metrics: Vec::new(),
            ..b[1].clone()
        };
        let changed = alarms::diff(&observed, &c[1]);
        assert!(
            changed.iter().any(|l| l.starts_with("description:")),
            "{changed:?}"
        );
        assert!(
            changed.iter().any(|l| l == "threshold: 3 -> 9"),
            "{changed:?}"
        );
    }

    #[test]
    fn the_account_quota_of_200_insights_alarms_is_enforced() {
        let names: Vec<String> = (0..67).map(|i| format!("app{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let c = config(&refs, "");
        let e = validate_fleet(&c, &desired(&c, None), 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("201 Metrics Insights alarms") || e.contains("exceed AWS's 200"),
            "{e}"
        );
        let c = config(&refs[..66], "");
        validate_fleet(&c, &desired(&c, None), 2).unwrap();
        let e = validate_fleet(&c, &desired(&c, None), 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("plus 3 already in the account"), "{e}");
    }

    #[test]
    fn limits_of_query_alarms_the_stand_in_does_not_enforce() {
        let c = config(&["a"], "auto_scaling_group = \"g\"\n");
        let all = desired(&c, None);
        let insight = all[0].clone();
        let math = all.last().unwrap().clone();
        let err = |a: AlarmSpec| validate_queries(&a).unwrap_err().to_string();
        // Period: Metrics Insights has 1-minute granularity.
        let mut x = insight.clone();
        x.period = 30;
        x.metrics[0].period = 30;
        assert!(err(x).contains("multiple of 60"));
        // 500 series at most, chosen with ORDER BY.
        let mut x = insight.clone();
        x.metrics[0].source =
            QuerySource::Expression("SELECT MAX(ServiceStatus) FROM SCHEMA(\"N\", App) GROUP BY InstanceId ORDER BY MAX() ASC LIMIT 501".into());
        assert!(err(x).contains("LIMIT 1..=500"));
        let mut x = insight.clone();
        x.metrics[0].source = QuerySource::Expression(
            "SELECT MAX(ServiceStatus) FROM SCHEMA(\"N\", App) GROUP BY InstanceId".into(),
        );
        assert!(err(x).contains("ORDER BY"));
        let mut x = insight.clone();
        x.metrics[0].source =
            QuerySource::Expression("SELECT MAX(ServiceStatus) FROM \"N\"".into());
        assert!(err(x).contains("GROUP BY"));
        // 3 hours evaluated at most.
        let mut x = insight.clone();
        x.evaluation_periods = 181;
        x.datapoints_to_alarm = 1;
        assert!(err(x).contains("3 hours"));
        // Metric math: 10 metrics, one period, one result.
        let mut x = math.clone();
        let m = x.metrics[0].clone();
        x.metrics.splice(
            0..0,
            (0..9).map(|i| MetricQuery {
                id: format!("m{i}"),
                ..m.clone()
            }),
        );
        assert!(err(x).contains("at most 10 metrics"));
        let mut x = math.clone();
        x.metrics[1].period = 60;
        assert!(err(x).contains("same period"));
        let mut x = math.clone();
        x.metrics[0].return_data = true;
        assert!(err(x).contains("exactly one"));
        let mut x = math.clone();
        x.metrics[0].id = "InService".into();
        assert!(err(x).contains("lowercase"));
        let mut x = math;
        x.metrics[2].source = QuerySource::Expression("x".repeat(2049));
        assert!(err(x).contains("2048"));
        // A quote in an app name cannot go into a query.
        let c = config(&["it's"], "");
        assert!(validate_fleet(&c, &desired(&c, None), 0)
            .unwrap_err()
            .to_string()
            .contains("quotes"));
    }
}
