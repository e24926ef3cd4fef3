//! The least-privilege IAM policy for exactly the AWS calls pmguard makes, built from typed
//! structs (never by hand-quoting JSON) and from the action lists the callers export: the agent's
//! `AGENT_IAM_ACTIONS` and provision-aws's `PROVISION_IAM_ACTIONS`.
//!
//! Resources are scoped per service: PutMetricData cannot take a resource, so it is conditioned
//! on the namespace; logs actions on the configured log group (and its streams); SNS actions on
//! the configured topic; alarm and dashboard actions on pmguard's name prefix.

use std::collections::BTreeMap;

use pmguard_agent::aws::names::AGENT_IAM_ACTIONS;
use pmguard_agent::config::{AwsConfig, Config};
use serde::Serialize;

/// The provision-aws calls (alarms, dashboard, topic subscription, log group retention).
pub const PROVISION_IAM_ACTIONS: &[&str] = &[
    "cloudwatch:DescribeAlarms",
    "cloudwatch:PutMetricAlarm",
    "cloudwatch:DeleteAlarms",
    "cloudwatch:GetDashboard",
    "cloudwatch:PutDashboard",
    "cloudwatch:DeleteDashboards",
    "logs:DescribeLogGroups",
    "logs:CreateLogGroup",
    "logs:PutRetentionPolicy",
    "logs:DeleteLogGroup",
    "sns:ListTopics",
    "sns:CreateTopic",
    "sns:ListSubscriptionsByTopic",
    "sns:Subscribe",
    "sns:DeleteTopic",
];

/// The prefix of every alarm and dashboard pmguard creates.
pub const NAME_PREFIX: &str = "pmguard-";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    #[serde(rename = "Version")]
    pub version: &'static str,
    #[serde(rename = "Statement")]
    pub statements: Vec<Statement>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Statement {
    #[serde(rename = "Sid")]
    pub sid: String,
    #[serde(rename = "Effect")]
    pub effect: &'static str,
    #[serde(rename = "Action")]
    pub actions: Vec<String>,
    #[serde(rename = "Resource")]
    pub resources: Vec<String>,
    #[serde(rename = "Condition", skip_serializing_if = "Option::is_none")]
    pub condition: Option<BTreeMap<&'static str, BTreeMap<&'static str, String>>>,
}

/// Which statement an action belongs to, and on what resources.
fn scope(action: &str, aws: &AwsConfig) -> (&'static str, Vec<String>) {
    let region = aws.region.as_deref().unwrap_or("*");
    let group = &aws.log_group;
    match action {
        "cloudwatch:PutMetricData" => ("PutMetricsInNamespace", vec!["*".into()]),
        a if a.starts_with("cloudwatch:") && a.contains("Dashboard") => (
            "ManageDashboards",
            vec![format!("arn:aws:cloudwatch::*:dashboard/{NAME_PREFIX}*")],
        ),
        "cloudwatch:DescribeAlarms" => (
            "DescribeAlarms",
            vec![format!("arn:aws:cloudwatch:{region}:*:alarm:*")],
        ),
        a if a.starts_with("cloudwatch:") => (
            "ManageAlarms",
            vec![format!(
                "arn:aws:cloudwatch:{region}:*:alarm:{NAME_PREFIX}*"
            )],
        ),
        // DescribeLogGroups takes no resource: it lists.
        "logs:DescribeLogGroups" => ("DescribeLogGroups", vec!["*".into()]),
        a if a.starts_with("logs:") => (
            "EventsLogGroup",
            vec![
                format!("arn:aws:logs:{region}:*:log-group:{group}"),
                format!("arn:aws:logs:{region}:*:log-group:{group}:log-stream:*"),
            ],
        ),
        // ListTopics takes no resource: it lists.
        "sns:ListTopics" => ("ListTopics", vec!["*".into()]),
        a if a.starts_with("sns:") => {
            let topic = aws.sns_topic.as_deref().unwrap_or("pmguard-alerts");
            (
                "AlertsTopic",
                vec![format!("arn:aws:sns:{region}:*:{topic}")],
            )
        }
        _ => ("Other", vec!["*".into()]),
    }
}

/// The policy for a config; `None` when it has no `[aws]` section (nothing to grant).
pub fn policy(config: &Config) -> Option<Policy> {
    let aws = config.aws.as_ref()?;
    let mut by_sid: BTreeMap<&'static str, Statement> = BTreeMap::new();
    let mut actions: Vec<&str> = AGENT_IAM_ACTIONS.to_vec();
    actions.extend_from_slice(PROVISION_IAM_ACTIONS);
    for action in actions {
        if action.starts_with("sns:") && aws.sns_topic.is_none() {
            continue;
        }
        let (sid, resources) = scope(action, aws);
        let st = by_sid.entry(sid).or_insert_with(|| Statement {
            sid: sid.to_string(),
            effect: "Allow",
            actions: Vec::new(),
            resources,
            condition: None,
        });
        if !st.actions.iter().any(|a| a == action) {
            st.actions.push(action.to_string());
        }
        if sid == "PutMetricsInNamespace" {
            let mut eq = BTreeMap::new();
            eq.insert("cloudwatch:namespace", aws.namespace.clone());
            let mut cond = BTreeMap::new();
            cond.insert("StringEquals", eq);
            st.condition = Some(cond);
        }
    }
    let mut statements: Vec<Statement> = by_sid.into_values().collect();
    for s in &mut statements {
        s.actions.sort();
    }
    Some(Policy {
        version: "2012-10-17",
        statements,
    })
}

pub fn to_json(p: &Policy) -> String {
    let mut s = serde_json::to_string_pretty(p).unwrap_or_default();
    s.push('\n');
    s
}

/// Every action the policy grants.
pub fn actions(p: &Policy) -> Vec<String> {
    let mut v: Vec<String> = p
        .statements
        .iter()
        .flat_map(|s| s.actions.clone())
        .collect();
    v.sort();
    v.dedup();
    v
}
