//! The two least-privilege IAM policies, built from typed structs (never by hand-quoting JSON)
//! and from the action lists the callers export:
//!
//! - `iam-agent-policy.json`, for the instance role: exactly what the box calls (the agent's
//!   sink: `AGENT_IAM_ACTIONS`, or `FLEET_AGENT_IAM_ACTIONS` in fleet mode, where an instance
//!   creates nothing shared: no Delete*, no Subscribe, no alarm, no CreateLogGroup/CreateTopic);
//! - `iam-admin-policy.json`, for whoever runs `pmguard provision-aws` (and `--destroy`,
//!   `uninstall --aws` in single-box mode, `fleet push-config`): `ADMIN_IAM_ACTIONS`.
//!
//! Resources are scoped per service: PutMetricData cannot take a resource, so it is conditioned
//! on the namespace; logs actions on the configured log group (and its streams); SNS actions on
//! the configured topic; alarm and dashboard actions on pmguard's names (the fleet's exactly in
//! fleet mode); List/Describe calls that cannot take a resource on `*`. The account is `*`: the
//! config does not know it.
//!
//! Invariant (tested): each policy's actions are the calls the code makes on that side, no more.

use std::collections::BTreeMap;

use pmguard_agent::aws::names::agent_iam_actions;
use pmguard_agent::config::{AwsConfig, Config};
use serde::Serialize;

/// The calls of provision-aws, `provision-aws --destroy`, `uninstall --aws` (single box) and
/// `fleet push-config`: the admin side.
pub const ADMIN_IAM_ACTIONS: &[&str] = &[
    "cloudwatch:DescribeAlarms",
    "cloudwatch:PutMetricAlarm",
    "cloudwatch:DeleteAlarms",
    "cloudwatch:GetDashboard",
    "cloudwatch:PutDashboard",
    "cloudwatch:DeleteDashboards",
    "logs:DescribeLogGroups",
    "logs:DescribeLogStreams",
    "logs:CreateLogGroup",
    "logs:PutRetentionPolicy",
    "logs:DeleteLogGroup",
    "sns:ListTopics",
    "sns:CreateTopic",
    "sns:ListSubscriptionsByTopic",
    "sns:Subscribe",
    "sns:DeleteTopic",
    "ssm:PutParameter",
    "ssm:GetParameter",
];

/// The admin side's calls, kept under the name the agent crate's docs use.
pub const PROVISION_IAM_ACTIONS: &[&str] = ADMIN_IAM_ACTIONS;

/// Box-side calls besides the agent's: `pmguard install --config ssm:NAME` reads the parameter.
pub const INSTALL_IAM_ACTIONS: &[&str] = &["ssm:GetParameter"];

/// The prefix of every alarm and dashboard pmguard creates.
pub const NAME_PREFIX: &str = "pmguard-";

pub const AGENT_POLICY_PATH: &str = "/etc/pmguard/iam-agent-policy.json";
pub const ADMIN_POLICY_PATH: &str = "/etc/pmguard/iam-admin-policy.json";

/// Where a fleet's config parameters live; the instance role may read only these.
pub fn parameter_prefix(fleet: &str) -> String {
    format!("/pmguard/{fleet}/")
}

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
    let fleet = aws.fleet.as_deref();
    match action {
        "cloudwatch:PutMetricData" => ("PutMetricsInNamespace", vec!["*".into()]),
        a if a.starts_with("cloudwatch:") && a.contains("Dashboard") => (
            "ManageDashboards",
            vec![match fleet {
                Some(f) => format!("arn:aws:cloudwatch::*:dashboard/{NAME_PREFIX}fleet-{f}"),
                None => format!("arn:aws:cloudwatch::*:dashboard/{NAME_PREFIX}*"),
            }],
        ),
        // Provision counts the account's Metrics Insights alarms (a shared quota) and checks
        // who else notifies the topic: it reads every alarm, and changes only its own.
        "cloudwatch:DescribeAlarms" => (
            "DescribeAlarms",
            vec![format!("arn:aws:cloudwatch:{region}:*:alarm:*")],
        ),
        a if a.starts_with("cloudwatch:") => (
            "ManageAlarms",
            vec![match fleet {
                Some(f) => format!("arn:aws:cloudwatch:{region}:*:alarm:{NAME_PREFIX}fleet-{f}-*"),
                None => format!("arn:aws:cloudwatch:{region}:*:alarm:{NAME_PREFIX}*"),
            }],
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
        a if a.starts_with("ssm:") => (
            "FleetConfigParameter",
            vec![format!(
                "arn:aws:ssm:{region}:*:parameter{}*",
                parameter_prefix(fleet.unwrap_or("default"))
            )],
        ),
        _ => ("Other", vec!["*".into()]),
    }
}

/// The box side's actions for a config: the agent's, plus reading the fleet's config parameter
/// in fleet mode.
pub fn agent_actions(config: &Config) -> Vec<&'static str> {
    let Some(aws) = config.aws.as_ref() else {
        return Vec::new();
    };
    let mut v = agent_iam_actions(aws.sns_topic.is_some(), aws.fleet.is_some());
    if aws.fleet.is_some() {
        v.extend_from_slice(INSTALL_IAM_ACTIONS);
    }
    v
}

/// The admin side's actions for a config: SNS only with a topic, SSM only for a fleet.
pub fn admin_actions(config: &Config) -> Vec<&'static str> {
    let Some(aws) = config.aws.as_ref() else {
        return Vec::new();
    };
    ADMIN_IAM_ACTIONS
        .iter()
        .copied()
        .filter(|a| aws.sns_topic.is_some() || !a.starts_with("sns:"))
        .filter(|a| aws.fleet.is_some() || !a.starts_with("ssm:"))
        .collect()
}

fn build(aws: &AwsConfig, actions: &[&str]) -> Policy {
    let mut by_sid: BTreeMap<&'static str, Statement> = BTreeMap::new();
    for action in actions {
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
    Policy {
        version: "2012-10-17",
        statements,
    }
}

/// The instance role's policy; `None` without an `[aws]` section (nothing to grant).
pub fn agent_policy(config: &Config) -> Option<Policy> {
    let aws = config.aws.as_ref()?;
    Some(build(aws, &agent_actions(config)))
}

/// The provisioning policy (admin workstation or CI); `None` without an `[aws]` section.
pub fn admin_policy(config: &Config) -> Option<Policy> {
    let aws = config.aws.as_ref()?;
    let mut p = build(aws, &admin_actions(config));
    // `provision-aws --remove-legacy-alarms` deletes the old monitor's alarms (`PM2-<App>-...`,
    // see aws::legacy_alarms), which are not pmguard's names.
    let region = aws.region.as_deref().unwrap_or("*");
    p.statements.push(Statement {
        sid: "RemoveOldMonitorAlarms".into(),
        effect: "Allow",
        actions: vec!["cloudwatch:DeleteAlarms".into()],
        resources: vec![format!("arn:aws:cloudwatch:{region}:*:alarm:PM2-*")],
        condition: None,
    });
    Some(p)
}

/// The policy with the account filled into every ARN that has `*` for it (`pmguard fleet iam
/// --account`): resources scoped to one account when it is known.
pub fn with_account(mut p: Policy, account: &str) -> Result<Policy, crate::Error> {
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(crate::Error::AccountId {
            account: account.to_string(),
        });
    }
    for st in &mut p.statements {
        for r in &mut st.resources {
            let mut parts: Vec<&str> = r.splitn(6, ':').collect();
            if parts.len() == 6 && parts[0] == "arn" && parts[4] == "*" {
                parts[4] = account;
                *r = parts.join(":");
            }
        }
    }
    Ok(p)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> Config {
        Config::parse(
            Path::new("/c.toml"),
            &format!("[[apps]]\nname = \"a\"\n[aws]\nregion = \"us-east-1\"\n{extra}"),
        )
        .unwrap()
    }

    /// Every `explain("Call", "service:Action", ...)` in the installer's AWS code.
    fn actions_called_in(source: &str) -> Vec<String> {
        let mut v: Vec<String> = source
            .split("explain(")
            .skip(1)
            .filter_map(|rest| {
                let mut quoted = rest.split('"');
                let _ = quoted.next()?;
                let _call = quoted.next()?;
                let _ = quoted.next()?;
                quoted.next().map(str::to_string)
            })
            .filter(|a| a.contains(':'))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    #[test]
    fn the_admin_policy_grants_exactly_the_calls_the_admin_side_makes() {
        let mut made = actions_called_in(include_str!("aws/provision.rs"));
        made.extend(actions_called_in(include_str!("aws/ssm.rs")));
        made.sort();
        made.dedup();
        let c = config("fleet = \"web\"\n");
        assert_eq!(actions(&admin_policy(&c).unwrap()), made);
    }

    #[test]
    fn a_fleet_instance_role_cannot_delete_subscribe_or_touch_alarms() {
        let c = config("fleet = \"web\"\n");
        let granted = actions(&agent_policy(&c).unwrap());
        assert_eq!(
            granted,
            [
                "cloudwatch:PutMetricData",
                "logs:CreateLogStream",
                "logs:PutLogEvents",
                "sns:Publish",
                "ssm:GetParameter"
            ]
        );
        for a in &granted {
            let verb = a.split(':').nth(1).unwrap();
            assert!(!verb.starts_with("Delete") && verb != "Subscribe" && !verb.contains("Alarm"));
        }
        let p = agent_policy(&c).unwrap();
        let ssm = p
            .statements
            .iter()
            .find(|s| s.sid == "FleetConfigParameter")
            .unwrap();
        assert_eq!(
            ssm.resources,
            ["arn:aws:ssm:us-east-1:*:parameter/pmguard/web/*"]
        );
        let logs = p
            .statements
            .iter()
            .find(|s| s.sid == "EventsLogGroup")
            .unwrap();
        assert_eq!(
            logs.resources[0],
            "arn:aws:logs:us-east-1:*:log-group:/pmguard/web"
        );
    }

    #[test]
    fn the_admin_policy_of_a_fleet_is_scoped_to_that_fleet() {
        let p = admin_policy(&config("fleet = \"web\"\n")).unwrap();
        let alarms = p
            .statements
            .iter()
            .find(|s| s.sid == "ManageAlarms")
            .unwrap();
        assert_eq!(
            alarms.resources,
            ["arn:aws:cloudwatch:us-east-1:*:alarm:pmguard-fleet-web-*"]
        );
        assert!(alarms
            .actions
            .contains(&"cloudwatch:DeleteAlarms".to_string()));
        let single = admin_policy(&config("")).unwrap();
        assert!(actions(&single)
            .iter()
            .all(|a| !a.starts_with("ssm:") && !a.starts_with("sns:")));
    }

    #[test]
    fn a_known_account_scopes_every_arn_to_it() {
        let c = config("fleet = \"web\"\n");
        let p = with_account(admin_policy(&c).unwrap(), "123456789012").unwrap();
        let json = to_json(&p);
        assert!(!json.contains(":*:"), "{json}");
        assert!(
            json.contains("arn:aws:cloudwatch:us-east-1:123456789012:alarm:pmguard-fleet-web-*")
        );
        assert!(json.contains("arn:aws:cloudwatch::123456789012:dashboard/pmguard-fleet-web"));
        assert!(json
            .contains("arn:aws:logs:us-east-1:123456789012:log-group:/pmguard/web:log-stream:*"));
        // Resource "*" (PutMetricData, List*) stays as it is: those calls take no resource.
        assert!(json.contains("\"*\""));
        assert!(with_account(admin_policy(&c).unwrap(), "12345").is_err());
    }

    #[test]
    fn single_box_agent_keeps_creating_its_group_and_resolving_its_topic() {
        let c = config("sns_topic = \"t\"\n");
        assert_eq!(
            actions(&agent_policy(&c).unwrap()),
            [
                "cloudwatch:PutMetricData",
                "logs:CreateLogGroup",
                "logs:CreateLogStream",
                "logs:PutLogEvents",
                "logs:PutRetentionPolicy",
                "sns:CreateTopic",
                "sns:Publish"
            ]
        );
    }
}
