//! The per-instance CloudWatch dashboard, built from typed structs and serialized with serde.
//! Widgets: response time p50/p99, ServiceStatus, restarts, CPU and memory, one line per app.

use pmguard_agent::aws::names::{
    CPU_PERCENT, DIM_APP, DIM_INSTANCE_ID, MEMORY_BYTES, RESPONSE_TIME, SERVICE_RESTARTS,
    SERVICE_STATUS,
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
