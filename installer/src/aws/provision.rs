//! observe -> plan -> apply against AWS. Only Describe/List/Get calls observe; a plan whose
//! steps are empty makes no mutating call ("Nothing to do."). PutMetricAlarm overwrites
//! unconditionally, so an alarm is written only when a field differs. Only names that start
//! with this instance's `pmguard-<instance>-` prefix are ever deleted. AWS errors name the call,
//! the IAM action it needs, and the fix.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_cloudwatch::error::ProvideErrorMetadata;
use aws_sdk_cloudwatch::types::{ComparisonOperator, Dimension, Statistic};
use pmguard_agent::config::Config;

use super::alarms::{self, AlarmSpec};
use super::dashboard;

/// Stands for the topic's ARN in a plan made before the topic exists.
pub const TOPIC_TO_CREATE: &str = "(the topic, once created)";

pub struct Clients {
    pub cw: aws_sdk_cloudwatch::Client,
    pub logs: aws_sdk_cloudwatchlogs::Client,
    pub sns: aws_sdk_sns::Client,
    pub region: String,
}

/// SDK clients with explicit timeouts and retries (the SDK's defaults can hang for minutes).
pub async fn clients(config: &Config) -> Clients {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .read_timeout(Duration::from_secs(10))
                .operation_timeout(Duration::from_secs(30))
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(3));
    if let Some(r) = config.aws.as_ref().and_then(|a| a.region.clone()) {
        loader = loader.region(aws_config::Region::new(r));
    }
    let sdk = loader.load().await;
    let region = sdk
        .region()
        .map_or("us-east-1".to_string(), |r| r.to_string());
    Clients {
        cw: aws_sdk_cloudwatch::Client::new(&sdk),
        logs: aws_sdk_cloudwatchlogs::Client::new(&sdk),
        sns: aws_sdk_sns::Client::new(&sdk),
        region,
    }
}

/// What is in AWS now, as far as pmguard is concerned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AwsObserved {
    pub topic_arn: Option<String>,
    /// Subscriptions of the topic: endpoint -> subscription ARN ("PendingConfirmation" until confirmed).
    pub subscriptions: BTreeMap<String, String>,
    /// The log group and its retention, when it exists.
    pub log_group: Option<Option<i32>>,
    /// This instance's pmguard alarms by name.
    pub alarms: BTreeMap<String, AlarmSpec>,
    pub dashboard: Option<serde_json::Value>,
}

/// One change to make in AWS.
#[derive(Debug, Clone, PartialEq)]
pub enum AwsStep {
    CreateTopic {
        name: String,
    },
    Subscribe {
        email: String,
    },
    CreateLogGroup {
        name: String,
    },
    PutRetention {
        name: String,
        days: i32,
        old: Option<i32>,
    },
    PutAlarm {
        spec: Box<AlarmSpec>,
        changes: Option<Vec<String>>,
    },
    DeleteAlarm {
        name: String,
    },
    PutDashboard {
        name: String,
        body: String,
        exists: bool,
    },
    DeleteDashboard {
        name: String,
    },
    DeleteTopic {
        arn: String,
    },
    DeleteLogGroup {
        name: String,
    },
}

/// An AWS call that failed, explained.
#[derive(Debug, thiserror::Error)]
#[error("{call} failed: {detail}\n  fix: {fix}")]
pub struct AwsError {
    pub call: &'static str,
    pub detail: String,
    pub fix: String,
}

fn explain<E: ProvideErrorMetadata + std::fmt::Debug>(
    call: &'static str,
    action: &str,
    err: aws_sdk_cloudwatch::error::SdkError<E>,
) -> AwsError {
    use aws_sdk_cloudwatch::error::SdkError;
    let (code, message) = match &err {
        SdkError::ServiceError(e) => (
            e.err().code().unwrap_or("").to_string(),
            e.err().message().unwrap_or("").to_string(),
        ),
        other => (String::new(), format!("{other:?}")),
    };
    let fix = match code.as_str() {
        "AccessDenied" | "AccessDeniedException" | "AuthorizationError" | "UnauthorizedOperation" => format!(
            "the credentials lack IAM permission `{action}`: attach /etc/pmguard/iam-policy.json (printed by `pmguard install`) to the role, then run again"
        ),
        "Throttling" | "ThrottlingException" | "TooManyRequestsException" => {
            "AWS is throttling: run again in a minute; what was applied stays applied and the next run resumes".into()
        }
        "InvalidClientTokenId" | "UnrecognizedClientException" | "ExpiredToken" | "ExpiredTokenException" => {
            "the credentials are invalid or expired: check the instance profile or AWS_PROFILE".into()
        }
        "" => "cannot reach AWS: check the network, the region and AWS_ENDPOINT_URL; the next run resumes".into(),
        _ => "see the message; the next run resumes from what was applied".into(),
    };
    let detail = if code.is_empty() {
        message
    } else {
        format!("{code}: {message}")
    };
    AwsError { call, detail, fix }
}

/// Reads what pmguard manages for this instance.
pub async fn observe(
    c: &Clients,
    config: &Config,
    instance: &str,
) -> Result<AwsObserved, AwsError> {
    let Some(aws) = config.aws.as_ref() else {
        return Ok(AwsObserved::default());
    };
    let mut obs = AwsObserved::default();
    if let Some(topic) = &aws.sns_topic {
        let mut token = None;
        loop {
            let out = c
                .sns
                .list_topics()
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| explain("ListTopics", "sns:ListTopics", e))?;
            for t in out.topics() {
                if let Some(arn) = t.topic_arn() {
                    if arn.rsplit(':').next() == Some(topic.as_str()) {
                        obs.topic_arn = Some(arn.to_string());
                    }
                }
            }
            token = out.next_token().map(str::to_string);
            if token.is_none() || obs.topic_arn.is_some() {
                break;
            }
        }
        if let Some(arn) = &obs.topic_arn {
            let out = c
                .sns
                .list_subscriptions_by_topic()
                .topic_arn(arn)
                .send()
                .await
                .map_err(|e| {
                    explain(
                        "ListSubscriptionsByTopic",
                        "sns:ListSubscriptionsByTopic",
                        e,
                    )
                })?;
            for s in out.subscriptions() {
                if let (Some(ep), Some(sarn)) = (s.endpoint(), s.subscription_arn()) {
                    obs.subscriptions.insert(ep.to_string(), sarn.to_string());
                }
            }
        }
    }
    let groups = c
        .logs
        .describe_log_groups()
        .log_group_name_prefix(&aws.log_group)
        .send()
        .await
        .map_err(|e| explain("DescribeLogGroups", "logs:DescribeLogGroups", e))?;
    obs.log_group = groups
        .log_groups()
        .iter()
        .find(|g| g.log_group_name() == Some(aws.log_group.as_str()))
        .map(|g| g.retention_in_days());
    let prefix = alarms::instance_prefix(instance);
    let mut token = None;
    loop {
        let out =
            c.cw.describe_alarms()
                .alarm_name_prefix(&prefix)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| explain("DescribeAlarms", "cloudwatch:DescribeAlarms", e))?;
        for a in out.metric_alarms() {
            let spec = AlarmSpec {
                name: a.alarm_name().unwrap_or_default().to_string(),
                description: a.alarm_description().unwrap_or_default().to_string(),
                namespace: a.namespace().unwrap_or_default().to_string(),
                metric: a.metric_name().unwrap_or_default().to_string(),
                statistic: a
                    .statistic()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
                dimensions: a
                    .dimensions()
                    .iter()
                    .map(|d| {
                        (
                            d.name().unwrap_or_default().to_string(),
                            d.value().unwrap_or_default().to_string(),
                        )
                    })
                    .collect(),
                period: a.period().unwrap_or(0),
                evaluation_periods: a.evaluation_periods().unwrap_or(0),
                datapoints_to_alarm: a
                    .datapoints_to_alarm()
                    .unwrap_or(a.evaluation_periods().unwrap_or(0)),
                threshold: a.threshold().unwrap_or(0.0),
                comparison: a
                    .comparison_operator()
                    .map(|c| c.as_str().to_string())
                    .unwrap_or_default(),
                treat_missing_data: a.treat_missing_data().unwrap_or("missing").to_string(),
                actions: a.alarm_actions().to_vec(),
            };
            obs.alarms.insert(spec.name.clone(), spec);
        }
        token = out.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    match c
        .cw
        .get_dashboard()
        .dashboard_name(dashboard::name(instance))
        .send()
        .await
    {
        Ok(out) => {
            obs.dashboard = out
                .dashboard_body()
                .and_then(|b| serde_json::from_str(b).ok());
        }
        Err(e) => {
            let missing = e.as_service_error().is_some_and(|s| {
                s.is_dashboard_not_found_error() || s.code() == Some("ResourceNotFound")
            });
            if !missing {
                return Err(explain("GetDashboard", "cloudwatch:GetDashboard", e));
            }
        }
    }
    Ok(obs)
}

/// Every step that converges AWS to the config (pure).
pub fn plan(
    config: &Config,
    instance: &str,
    region: &str,
    obs: &AwsObserved,
) -> Result<Vec<AwsStep>, String> {
    let Some(aws) = config.aws.as_ref() else {
        return Err("the config has no [aws] section: nothing to provision".into());
    };
    let mut steps = Vec::new();
    let topic_arn = match (&aws.sns_topic, &obs.topic_arn) {
        (Some(_), Some(arn)) => Some(arn.clone()),
        (Some(name), None) => {
            steps.push(AwsStep::CreateTopic { name: name.clone() });
            Some(TOPIC_TO_CREATE.to_string())
        }
        (None, _) => None,
    };
    if let (Some(email), Some(_)) = (&aws.alarm_email, &topic_arn) {
        if !obs.subscriptions.contains_key(email) {
            steps.push(AwsStep::Subscribe {
                email: email.clone(),
            });
        }
    }
    let days = aws.log_retention_days as i32;
    match obs.log_group {
        None => {
            steps.push(AwsStep::CreateLogGroup {
                name: aws.log_group.clone(),
            });
            steps.push(AwsStep::PutRetention {
                name: aws.log_group.clone(),
                days,
                old: None,
            });
        }
        Some(old) if old != Some(days) => steps.push(AwsStep::PutRetention {
            name: aws.log_group.clone(),
            days,
            old,
        }),
        Some(_) => {}
    }
    let desired = alarms::desired(config, instance, topic_arn.as_deref());
    for spec in &desired {
        alarms::validate(spec)?;
        match obs.alarms.get(&spec.name) {
            None => steps.push(AwsStep::PutAlarm {
                spec: Box::new(spec.clone()),
                changes: None,
            }),
            Some(old) => {
                let changes = alarms::diff(old, spec);
                if !changes.is_empty() {
                    steps.push(AwsStep::PutAlarm {
                        spec: Box::new(spec.clone()),
                        changes: Some(changes),
                    });
                }
            }
        }
    }
    for name in obs.alarms.keys() {
        if !desired.iter().any(|d| &d.name == name) {
            steps.push(AwsStep::DeleteAlarm { name: name.clone() });
        }
    }
    if let Some(d) = dashboard::build(config, instance, region) {
        let body = dashboard::to_json(&d);
        let want: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if obs.dashboard.as_ref() != Some(&want) {
            steps.push(AwsStep::PutDashboard {
                name: dashboard::name(instance),
                body,
                exists: obs.dashboard.is_some(),
            });
        }
    }
    Ok(steps)
}

/// Steps that remove everything provision-aws created for this instance.
pub fn plan_removal(config: &Config, instance: &str, obs: &AwsObserved) -> Vec<AwsStep> {
    let mut steps: Vec<AwsStep> = obs
        .alarms
        .keys()
        .map(|n| AwsStep::DeleteAlarm { name: n.clone() })
        .collect();
    if obs.dashboard.is_some() {
        steps.push(AwsStep::DeleteDashboard {
            name: dashboard::name(instance),
        });
    }
    if let Some(arn) = &obs.topic_arn {
        steps.push(AwsStep::DeleteTopic { arn: arn.clone() });
    }
    if let (Some(aws), Some(_)) = (config.aws.as_ref(), obs.log_group) {
        steps.push(AwsStep::DeleteLogGroup {
            name: aws.log_group.clone(),
        });
    }
    steps
}

/// The plan as shown to a person.
pub fn display(steps: &[AwsStep], obs: &AwsObserved, config: &Config) -> String {
    let mut out = String::new();
    if steps.is_empty() {
        out.push_str("Nothing to do.\n");
    }
    for s in steps {
        let _ = match s {
            AwsStep::CreateTopic { name } => writeln!(out, "create SNS topic {name}"),
            AwsStep::Subscribe { email } => writeln!(
                out,
                "subscribe {email} to the topic (AWS sends a confirmation email)"
            ),
            AwsStep::CreateLogGroup { name } => writeln!(out, "create log group {name}"),
            AwsStep::PutRetention { name, days, old } => match old {
                Some(o) => writeln!(out, "set retention of {name}: {o} -> {days} days"),
                None => writeln!(out, "set retention of {name}: {days} days"),
            },
            AwsStep::PutAlarm {
                spec,
                changes: None,
            } => writeln!(out, "create alarm {}", spec.name),
            AwsStep::PutAlarm {
                spec,
                changes: Some(c),
            } => {
                let _ = writeln!(out, "update alarm {}", spec.name);
                for line in c {
                    let _ = writeln!(out, "    {line}");
                }
                Ok(())
            }
            AwsStep::DeleteAlarm { name } => writeln!(out, "delete alarm {name}"),
            AwsStep::PutDashboard { name, exists, .. } => {
                writeln!(
                    out,
                    "{} dashboard {name}",
                    if *exists { "update" } else { "create" }
                )
            }
            AwsStep::DeleteDashboard { name } => writeln!(out, "delete dashboard {name}"),
            AwsStep::DeleteTopic { arn } => writeln!(out, "delete SNS topic {arn}"),
            AwsStep::DeleteLogGroup { name } => {
                writeln!(out, "delete log group {name} (and its events)")
            }
        };
    }
    if let Some(email) = config.aws.as_ref().and_then(|a| a.alarm_email.as_ref()) {
        if obs
            .subscriptions
            .get(email)
            .is_some_and(|s| s == "PendingConfirmation" || s == "pending confirmation")
        {
            let _ = writeln!(out, "note: {email} has not confirmed the subscription yet: alarm emails are not delivered until the link in AWS's email is clicked");
        }
    }
    out
}

/// Carries the steps out in order; returns how many mutating calls were made.
pub async fn apply(c: &Clients, steps: &[AwsStep]) -> Result<usize, AwsError> {
    let mut calls = 0;
    let mut topic_arn: Option<String> = None;
    for s in steps {
        calls += 1;
        match s {
            AwsStep::CreateTopic { name } => {
                let out = c
                    .sns
                    .create_topic()
                    .name(name)
                    .send()
                    .await
                    .map_err(|e| explain("CreateTopic", "sns:CreateTopic", e))?;
                topic_arn = out.topic_arn().map(str::to_string);
            }
            AwsStep::Subscribe { email } => {
                let arn = match &topic_arn {
                    Some(a) => a.clone(),
                    None => find_topic_arn(steps, c).await?,
                };
                c.sns
                    .subscribe()
                    .topic_arn(arn)
                    .protocol("email")
                    .endpoint(email)
                    .send()
                    .await
                    .map_err(|e| explain("Subscribe", "sns:Subscribe", e))?;
            }
            AwsStep::CreateLogGroup { name } => {
                if let Err(e) = c.logs.create_log_group().log_group_name(name).send().await {
                    if e.code() != Some("ResourceAlreadyExistsException") {
                        return Err(explain("CreateLogGroup", "logs:CreateLogGroup", e));
                    }
                }
            }
            AwsStep::PutRetention { name, days, .. } => {
                c.logs
                    .put_retention_policy()
                    .log_group_name(name)
                    .retention_in_days(*days)
                    .send()
                    .await
                    .map_err(|e| explain("PutRetentionPolicy", "logs:PutRetentionPolicy", e))?;
            }
            AwsStep::PutAlarm { spec, .. } => {
                let actions: Vec<String> = spec
                    .actions
                    .iter()
                    .map(|a| {
                        if a == TOPIC_TO_CREATE {
                            topic_arn.clone().unwrap_or_default()
                        } else {
                            a.clone()
                        }
                    })
                    .filter(|a| !a.is_empty())
                    .collect();
                c.cw.put_metric_alarm()
                    .alarm_name(&spec.name)
                    .alarm_description(&spec.description)
                    .namespace(&spec.namespace)
                    .metric_name(&spec.metric)
                    .statistic(Statistic::from(spec.statistic.as_str()))
                    .set_dimensions(Some(
                        spec.dimensions
                            .iter()
                            .map(|(n, v)| Dimension::builder().name(n).value(v).build())
                            .collect(),
                    ))
                    .period(spec.period)
                    .evaluation_periods(spec.evaluation_periods)
                    .datapoints_to_alarm(spec.datapoints_to_alarm)
                    .threshold(spec.threshold)
                    .comparison_operator(ComparisonOperator::from(spec.comparison.as_str()))
                    .treat_missing_data(&spec.treat_missing_data)
                    .set_alarm_actions(Some(actions.clone()))
                    .set_ok_actions(Some(actions))
                    .send()
                    .await
                    .map_err(|e| explain("PutMetricAlarm", "cloudwatch:PutMetricAlarm", e))?;
            }
            AwsStep::DeleteAlarm { name } => {
                c.cw.delete_alarms()
                    .alarm_names(name)
                    .send()
                    .await
                    .map_err(|e| explain("DeleteAlarms", "cloudwatch:DeleteAlarms", e))?;
            }
            AwsStep::PutDashboard { name, body, .. } => {
                c.cw.put_dashboard()
                    .dashboard_name(name)
                    .dashboard_body(body)
                    .send()
                    .await
                    .map_err(|e| explain("PutDashboard", "cloudwatch:PutDashboard", e))?;
            }
            AwsStep::DeleteDashboard { name } => {
                c.cw.delete_dashboards()
                    .dashboard_names(name)
                    .send()
                    .await
                    .map_err(|e| explain("DeleteDashboards", "cloudwatch:DeleteDashboards", e))?;
            }
            AwsStep::DeleteTopic { arn } => {
                c.sns
                    .delete_topic()
                    .topic_arn(arn)
                    .send()
                    .await
                    .map_err(|e| explain("DeleteTopic", "sns:DeleteTopic", e))?;
            }
            AwsStep::DeleteLogGroup { name } => {
                c.logs
                    .delete_log_group()
                    .log_group_name(name)
                    .send()
                    .await
                    .map_err(|e| explain("DeleteLogGroup", "logs:DeleteLogGroup", e))?;
            }
        }
    }
    Ok(calls)
}

/// The topic's ARN when the plan subscribes to an existing topic (the ARN was observed).
async fn find_topic_arn(steps: &[AwsStep], c: &Clients) -> Result<String, AwsError> {
    for s in steps {
        if let AwsStep::PutAlarm { spec, .. } = s {
            if let Some(a) = spec.actions.iter().find(|a| a.starts_with("arn:")) {
                return Ok(a.clone());
            }
        }
    }
    let out = c
        .sns
        .list_topics()
        .send()
        .await
        .map_err(|e| explain("ListTopics", "sns:ListTopics", e))?;
    out.topics()
        .first()
        .and_then(|t| t.topic_arn())
        .map(str::to_string)
        .ok_or(AwsError {
            call: "Subscribe",
            detail: "no topic to subscribe to".into(),
            fix: "set [aws] sns_topic".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config() -> Config {
        Config::parse(
            Path::new("/c.toml"),
            "[[apps]]\nname = \"codebox\"\n[aws]\nsns_topic = \"alerts\"\nalarm_email = \"ops@example.com\"\n",
        )
        .unwrap()
    }

    #[test]
    fn fresh_account_plan_display() {
        let c = config();
        let steps = plan(&c, "i-1", "us-east-1", &AwsObserved::default()).unwrap();
        insta::assert_snapshot!(
            "provision_fresh_plan",
            display(&steps, &AwsObserved::default(), &c)
        );
    }

    #[test]
    fn an_account_that_matches_plans_nothing() {
        let c = config();
        let arn = "arn:aws:sns:us-east-1:123:alerts".to_string();
        let mut obs = AwsObserved {
            topic_arn: Some(arn.clone()),
            log_group: Some(Some(30)),
            ..AwsObserved::default()
        };
        obs.subscriptions
            .insert("ops@example.com".into(), "PendingConfirmation".into());
        for a in alarms::desired(&c, "i-1", Some(&arn)) {
            obs.alarms.insert(a.name.clone(), a);
        }
        let d = dashboard::build(&c, "i-1", "us-east-1").unwrap();
        obs.dashboard = serde_json::from_str(&dashboard::to_json(&d)).ok();
        let steps = plan(&c, "i-1", "us-east-1", &obs).unwrap();
        assert!(steps.is_empty(), "{steps:?}");
        let shown = display(&steps, &obs, &c);
        assert!(shown.starts_with("Nothing to do.\n"));
        assert!(
            shown.contains("has not confirmed the subscription yet"),
            "{shown}"
        );
        // A stranger's alarm under another instance's prefix is not ours to delete.
        let removal = plan_removal(&c, "i-2", &AwsObserved::default());
        assert!(removal.is_empty());
    }

    #[test]
    fn retention_drift_is_corrected_alone() {
        let c = config();
        let mut obs = AwsObserved {
            topic_arn: Some("arn:aws:sns:us-east-1:1:alerts".into()),
            log_group: Some(Some(7)),
            ..AwsObserved::default()
        };
        obs.subscriptions.insert(
            "ops@example.com".into(),
            "arn:aws:sns:us-east-1:1:alerts:abc".into(),
        );
        for a in alarms::desired(&c, "i-1", obs.topic_arn.as_deref()) {
            obs.alarms.insert(a.name.clone(), a);
        }
        obs.dashboard = serde_json::from_str(&dashboard::to_json(
            &dashboard::build(&c, "i-1", "us-east-1").unwrap(),
        ))
        .ok();
        let steps = plan(&c, "i-1", "us-east-1", &obs).unwrap();
        assert_eq!(
            steps,
            vec![AwsStep::PutRetention {
                name: "/aws/ec2/pm2-health".into(),
                days: 30,
                old: Some(7)
            }]
        );
    }
}
