//! The CloudWatch dashboards, built from typed structs and serialized with serde.
//! Single box: response time p50/p99, ServiceStatus, restarts, CPU and memory, one line per app.
//! Fleet: per app, the fleet's instances side by side (Metrics Insights queries: status and
//! response time by instance), plus the fleet-wide restarts per app and the instances reporting.

use pmguard_agent::aws::names::{
    AGENT_HEARTBEAT, CPU_PERCENT, DIM_APP, DIM_FLEET, DIM_INSTANCE_ID, MEMORY_BYTES, RESPONSE_TIME,
    SERVICE_RESTARTS, SERVICE_STATUS,
};
use pmguard_agent::config::Config;
use serde::Serialize;

use crate::iam::NAME_PREFIX;

#[derive(Debug, Serialize, PartialEq)]
pub struct Dashboard {
    pub widgets: Vec<Widget>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Widget {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub properties: Properties,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Properties {
    pub title: String,
    pub region: String,
    pub view: &'static str,
    pub stacked: bool,
    pub period: u32,
    /// Each entry: `[namespace, metric, dim, value, dim, value, {"stat": ..., "label": ...}]`.
    pub metrics: Vec<Vec<serde_json::Value>>,
}

pub fn name(instance: &str) -> String {
    format!("{NAME_PREFIX}{instance}")
}

/// The dashboard body for this instance.
pub fn build(config: &Config, instance: &str, region: &str) -> Option<Dashboard> {
    let aws = config.aws.as_ref()?;
    let panels: [(&str, &str, &[&str]); 5] = [
        ("Response time (ms)", RESPONSE_TIME, &["p50", "p99"]),
        ("Service status (1 = healthy)", SERVICE_STATUS, &["Minimum"]),
        ("Restarts", SERVICE_RESTARTS, &["Sum"]),
        ("CPU (% of one core)", CPU_PERCENT, &["Maximum"]),
        ("Memory (bytes)", MEMORY_BYTES, &["Maximum"]),
    ];
    let widgets = panels
        .iter()
        .enumerate()
        .map(|(i, (title, metric, stats))| {
            let mut metrics = Vec::new();
            for app in &config.apps {
                for stat in *stats {
                    metrics.push(vec![
                        aws.namespace.clone().into(),
                        (*metric).into(),
                        DIM_APP.into(),
                        app.name.clone().into(),
                        DIM_INSTANCE_ID.into(),
                        instance.into(),
                        serde_json::json!({"stat": stat, "label": format!("{} {stat}", app.name)}),
                    ]);
                }
            }
            Widget {
                kind: "metric",
                x: (i as u32 % 2) * 12,
                y: (i as u32 / 2) * 6,
                width: 12,
                height: 6,
                properties: Properties {
                    title: format!("{title} on {instance}"),
                    region: region.to_string(),
                    view: "timeSeries",
                    stacked: false,
                    period: 60,
                    metrics,
                },
            }
        })
        .collect();
    Some(Dashboard { widgets })
}

pub fn to_json(d: &Dashboard) -> String {
    serde_json::to_string(d).unwrap_or_default()
}

fn widget(i: usize, title: String, region: &str, metrics: Vec<Vec<serde_json::Value>>) -> Widget {
    Widget {
        kind: "metric",
        x: (i as u32 % 2) * 12,
        y: (i as u32 / 2) * 6,
        width: 12,
        height: 6,
        properties: Properties {
            title,
            region: region.to_string(),
            view: "timeSeries",
            stacked: false,
            period: 60,
            metrics,
        },
    }
}

/// The fleet's dashboard (fleet mode): no instance named anywhere, so scale-out and scale-in
/// never change it.
pub fn build_fleet(config: &Config, region: &str) -> Option<Dashboard> {
    let aws = config.aws.as_ref()?;
    let fleet = aws.fleet.as_deref()?;
    let ns = &aws.namespace;
    let query =
        |func: &str, metric: &str, app: &str| per_instance_query(ns, fleet, func, metric, app);
    let mut widgets = Vec::new();
    let mut i = 0;
    for app in &config.apps {
        let panels = [
            ("status by instance (1 = healthy)", "MIN", SERVICE_STATUS),
            ("response time by instance (avg ms)", "AVG", RESPONSE_TIME),
        ];
        for (title, func, metric) in panels {
            widgets.push(widget(
                i,
                format!("{}: {title}", app.name),
                region,
                vec![vec![serde_json::json!({
                    "expression": query(func, metric, &app.name),
                    "id": format!("q{i}"),
                    "label": "",
                })]],
            ));
            i += 1;
        }
    }
    widgets.push(widget(
        i,
        format!("Restarts per app across fleet {fleet}"),
        region,
        vec![vec![serde_json::json!({
            "expression": format!("SELECT SUM({SERVICE_RESTARTS}) FROM SCHEMA(\"{ns}\", {DIM_APP}, {DIM_FLEET}, {DIM_INSTANCE_ID}) WHERE {DIM_FLEET} = '{fleet}' GROUP BY {DIM_APP}"),
            "id": "restarts",
            "label": "",
        })]],
    ));
    let per_minute = 60.0 / aws.flush_interval.as_secs().max(1) as f64;
    widgets.push(widget(
        i + 1,
        format!("Instances reporting in fleet {fleet}"),
        region,
        vec![
            vec![serde_json::json!({
                "expression": format!("FILL(beats, 0) / {per_minute}"),
                "id": "reporting",
                "label": "instances sending a heartbeat",
            })],
            vec![
                ns.clone().into(),
                AGENT_HEARTBEAT.into(),
                DIM_FLEET.into(),
                fleet.into(),
                serde_json::json!({"id": "beats", "stat": "SampleCount", "visible": false}),
            ],
        ],
    ));
    Some(Dashboard { widgets })
}

/// A Metrics Insights query for one app's metric on each instance of the fleet (the worst
/// first: lowest for MIN, highest otherwise).
fn per_instance_query(ns: &str, fleet: &str, func: &str, metric: &str, app: &str) -> String {
    format!(
        "SELECT {func}({metric}) FROM SCHEMA(\"{ns}\", {DIM_APP}, {DIM_FLEET}, {DIM_INSTANCE_ID}) WHERE {DIM_FLEET} = '{fleet}' AND {DIM_APP} = '{app}' GROUP BY {DIM_INSTANCE_ID} ORDER BY {func}() {} LIMIT 100",
        if func == "MIN" { "ASC" } else { "DESC" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_fleet_dashboard_shows_instances_side_by_side_and_names_none() {
        let c = Config::parse(
            Path::new("/c.toml"),
            "[[apps]]\nname = \"codebox\"\n[[apps]]\nname = \"worker\"\n[aws]\nfleet = \"web\"\ninstance_id = \"i-0abc\"\n",
        )
        .unwrap();
        let d = build_fleet(&c, "us-east-1").unwrap();
        let body = to_json(&d);
        assert_eq!(d.widgets.len(), 6);
        assert!(!body.contains("i-0abc"), "{body}");
        assert!(body.contains("WHERE Fleet = 'web' AND App = 'worker' GROUP BY InstanceId"));
        assert!(body.contains("GROUP BY App"));
        assert!(body.contains("FILL(beats, 0) / 1"));
        let again: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            again["widgets"][5]["properties"]["metrics"][1][1],
            "AgentHeartbeat"
        );
        assert!(build_fleet(
            &Config::parse(Path::new("/c.toml"), "[[apps]]\nname = \"a\"\n[aws]\n").unwrap(),
            "us-east-1"
        )
        .is_none());
    }
}
