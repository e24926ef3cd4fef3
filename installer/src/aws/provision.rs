//! observe -> plan -> apply against AWS. Only Describe/List/Get calls observe; a plan whose
//! steps are empty makes no mutating call ("Nothing to do."). PutMetricAlarm overwrites
//! unconditionally, so an alarm is written only when a field differs. AWS errors name the call,
//! the IAM action it needs, the policy that grants it, and the fix.
//!
//! Two modes, chosen by `[aws] fleet`:
//! - single box: alarms and a dashboard per instance; an alarm is the instance's when its name
//!   has the instance's prefix *and* its `InstanceId` dimension is exactly the instance;
//! - fleet: one set of alarms and one dashboard for the fleet (`fleet.rs`); an alarm is the
//!   fleet's when its description carries the fleet's marker.
//!
//! Three plans: `plan` (provision-aws: converge), `plan_removal` (`uninstall --aws` on one box:
//! never a resource another box still uses; nothing at all in fleet mode) and `plan_destroy`
//! (`provision-aws --destroy`: everything the config owns, listed first, applied only with `--yes`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_cloudwatch::error::ProvideErrorMetadata;
use aws_sdk_cloudwatch::types::{ComparisonOperator, Dimension, Statistic};
use pmguard_agent::config::{AwsConfig, Config};

use aws_sdk_cloudwatch::types::{Metric, MetricDataQuery, MetricStat};
use pmguard_agent::aws::names::{AGENT_IAM_ACTIONS, FLEET_AGENT_IAM_ACTIONS};

use super::alarms::{self, AlarmSpec, MetricQuery, QuerySource};
use super::{dashboard, fleet};

/// Stands for the topic's ARN in a plan made before the topic exists.
pub const TOPIC_TO_CREATE: &str = "(the topic, once created)";

pub struct Clients {
    pub cw: aws_sdk_cloudwatch::Client,
    pub logs: aws_sdk_cloudwatchlogs::Client,
    pub sns: aws_sdk_sns::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub region: String,
}

/// SDK clients with explicit timeouts and retries (the SDK's defaults can hang for minutes).
pub async fn clients(config: &Config) -> Clients {
    clients_for(config.aws.as_ref().and_then(|a| a.region.as_deref())).await
}

/// Clients in `region`, else the SDK chain's region (AWS_REGION, the profile, IMDS).
pub async fn clients_for(region: Option<&str>) -> Clients {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .read_timeout(Duration::from_secs(10))
                .operation_timeout(Duration::from_secs(30))
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(3));
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r.to_string()));
    }
    let sdk = loader.load().await;
    let region = sdk
        .region()
        .map_or("us-east-1".to_string(), |r| r.to_string());
    Clients {
        cw: aws_sdk_cloudwatch::Client::new(&sdk),
        logs: aws_sdk_cloudwatchlogs::Client::new(&sdk),
        sns: aws_sdk_sns::Client::new(&sdk),
        ssm: aws_sdk_ssm::Client::new(&sdk),
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
    /// This instance's (or this fleet's) pmguard alarms by name, exactly.
    pub alarms: BTreeMap<String, AlarmSpec>,
    pub dashboard: Option<serde_json::Value>,
    /// Metrics Insights alarms in the account and Region that are not ours (fleet mode; they
    /// count against the same quota).
    pub other_insights_alarms: usize,
}

/// Who else uses the shared resources (observed only for `uninstall --aws` on one box).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sharing {
    /// Alarms that are not this instance's and notify the topic.
    pub topic_users: Vec<String>,
    /// Log streams in the group other than this instance's.
    pub other_streams: Vec<String>,
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

impl AwsError {
    /// AWS refused the call for lack of an IAM permission (not a network or service failure).
    pub fn access_denied(&self) -> bool {
        [
            "AccessDenied",
            "AuthorizationError",
            "UnauthorizedOperation",
        ]
        .iter()
        .any(|c| self.detail.starts_with(c))
    }
}

pub(crate) fn explain<E: ProvideErrorMetadata + std::fmt::Debug>(
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
    let policy = if AGENT_IAM_ACTIONS.contains(&action) || FLEET_AGENT_IAM_ACTIONS.contains(&action)
    {
        "the instance role's policy (/etc/pmguard/iam-agent-policy.json, or `pmguard fleet iam --role agent --config FILE`)"
    } else {
        "the admin policy (`pmguard fleet iam --role admin --config FILE`, also /etc/pmguard/iam-admin-policy.json) to the role or user that runs provision-aws, never to an instance role"
    };
    let fix = match code.as_str() {
        "AccessDenied" | "AccessDeniedException" | "AuthorizationError" | "UnauthorizedOperation" => format!(
            "the credentials lack IAM permission `{action}`: attach {policy}, then run again"
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
    AwsError {
        call,
        detail: format!("{detail} (IAM action {action})"),
        fix,
    }
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
        obs.topic_arn = find_topic(c, topic).await?;
        if let Some(arn) = &obs.topic_arn {
            obs.subscriptions = subscriptions(c, arn).await?;
        }
    }
    obs.log_group = log_group_retention(c, &aws.log_group).await?;
    let fleet_name = aws.fleet.as_deref();
    obs.alarms = our_alarms(c, config, instance, fleet_name).await?;
    if fleet_name.is_some() {
        obs.other_insights_alarms = describe_alarms(c, None)
            .await?
            .iter()
            .filter(|a| fleet::is_insights(a) && !obs.alarms.contains_key(&a.name))
            .count();
    }
    let dashboard_name = match fleet_name {
        Some(f) => fleet::dashboard_name(f),
        None => dashboard::name(instance),
    };
    obs.dashboard = get_dashboard(c, dashboard_name).await?;
    Ok(obs)
}

/// The ARN of the topic named `topic`, if it exists (pages until found).
async fn find_topic(c: &Clients, topic: &str) -> Result<Option<String>, AwsError> {
    let mut found = None;
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
                if arn.rsplit(':').next() == Some(topic) {
                    found = Some(arn.to_string());
                }
            }
        }
        token = out.next_token().map(str::to_string);
        if token.is_none() || found.is_some() {
            return Ok(found);
        }
    }
}

/// The topic's subscriptions: endpoint -> subscription ARN.
async fn subscriptions(c: &Clients, arn: &str) -> Result<BTreeMap<String, String>, AwsError> {
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
    Ok(out
        .subscriptions()
        .iter()
        .filter_map(|s| match (s.endpoint(), s.subscription_arn()) {
            (Some(ep), Some(sarn)) => Some((ep.to_string(), sarn.to_string())),
            _ => None,
        })
        .collect())
}

/// The log group's retention (`Some(None)` when it keeps logs forever), `None` without it.
async fn log_group_retention(c: &Clients, name: &str) -> Result<Option<Option<i32>>, AwsError> {
    let groups = c
        .logs
        .describe_log_groups()
        .log_group_name_prefix(name)
        .send()
        .await
        .map_err(|e| explain("DescribeLogGroups", "logs:DescribeLogGroups", e))?;
    Ok(groups
        .log_groups()
        .iter()
        .find(|g| g.log_group_name() == Some(name))
        .map(|g| g.retention_in_days()))
}

/// This instance's (or fleet's) alarms, by name.
async fn our_alarms(
    c: &Clients,
    config: &Config,
    instance: &str,
    fleet_name: Option<&str>,
) -> Result<BTreeMap<String, AlarmSpec>, AwsError> {
    let prefix = match fleet_name {
        Some(f) => fleet::alarm_prefix(f),
        None => alarms::instance_prefix(instance),
    };
    // An alarm is ours when its name is one this config asks for (exactly), or when it carries
    // our mark (the fleet's marker, the instance's exact InstanceId): only those are updated or
    // deleted. A longer name under the same prefix (`web-2` next to `web`) is someone else's.
    let wanted: Vec<String> = match fleet_name {
        Some(_) => fleet::desired(config, None),
        None => alarms::desired(config, instance, None),
    }
    .into_iter()
    .map(|a| a.name)
    .collect();
    Ok(describe_alarms(c, Some(&prefix))
        .await?
        .into_iter()
        .filter(|spec| owns(spec, &wanted, fleet_name, instance))
        .map(|spec| (spec.name.clone(), spec))
        .collect())
}

/// The dashboard's body, `None` when there is no dashboard (or its body is not JSON).
async fn get_dashboard(c: &Clients, name: String) -> Result<Option<serde_json::Value>, AwsError> {
    match c.cw.get_dashboard().dashboard_name(name).send().await {
        Ok(out) => Ok(out
            .dashboard_body()
            .and_then(|b| serde_json::from_str(b).ok())),
        Err(e) => {
            let missing = e.as_service_error().is_some_and(|s| {
                s.is_dashboard_not_found_error() || s.code() == Some("ResourceNotFound")
            });
            if missing {
                Ok(None)
            } else {
                Err(explain("GetDashboard", "cloudwatch:GetDashboard", e))
            }
        }
    }
}

/// Every metric alarm whose name starts with `prefix` (all of them without one).
async fn describe_alarms(c: &Clients, prefix: Option<&str>) -> Result<Vec<AlarmSpec>, AwsError> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let page =
            c.cw.describe_alarms()
                .set_alarm_name_prefix(prefix.map(str::to_string))
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| explain("DescribeAlarms", "cloudwatch:DescribeAlarms", e))?;
        out.extend(page.metric_alarms().iter().map(observed_alarm));
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            return Ok(out);
        }
    }
}

fn pairs(dims: &[aws_sdk_cloudwatch::types::Dimension]) -> Vec<(String, String)> {
    dims.iter()
        .map(|d| {
            (
                d.name().unwrap_or_default().to_string(),
                d.value().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// An alarm as DescribeAlarms returns it, in pmguard's terms.
fn observed_alarm(a: &aws_sdk_cloudwatch::types::MetricAlarm) -> AlarmSpec {
    AlarmSpec {
        name: a.alarm_name().unwrap_or_default().to_string(),
        description: a.alarm_description().unwrap_or_default().to_string(),
        namespace: a.namespace().unwrap_or_default().to_string(),
        metric: a.metric_name().unwrap_or_default().to_string(),
        statistic: a
            .statistic()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        dimensions: pairs(a.dimensions()),
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
        metrics: a
            .metrics()
            .iter()
            .map(|q| observed_query(q, a.metrics()))
            .collect(),
    }
}

/// One metric data query of an alarm as DescribeAlarms returns it (`all` are its siblings).
fn observed_query(
    q: &aws_sdk_cloudwatch::types::MetricDataQuery,
    all: &[aws_sdk_cloudwatch::types::MetricDataQuery],
) -> MetricQuery {
    MetricQuery {
        id: q.id().unwrap_or_default().to_string(),
        label: q.label().unwrap_or_default().to_string(),
        // A math expression has no period of its own: it takes its metrics'.
        period: q
            .period()
            .or_else(|| q.metric_stat().and_then(|m| m.period()))
            .or_else(|| {
                all.iter()
                    .find_map(|m| m.metric_stat().and_then(|m| m.period()))
            })
            .unwrap_or(0),
        return_data: q.return_data().unwrap_or(true),
        source: match (q.expression(), q.metric_stat()) {
            (Some(e), _) => QuerySource::Expression(e.to_string()),
            (None, Some(ms)) => QuerySource::Metric {
                namespace: ms
                    .metric()
                    .and_then(|m| m.namespace())
                    .unwrap_or_default()
                    .to_string(),
                name: ms
                    .metric()
                    .and_then(|m| m.metric_name())
                    .unwrap_or_default()
                    .to_string(),
                dimensions: ms
                    .metric()
                    .map(|m| pairs(m.dimensions()))
                    .unwrap_or_default(),
                stat: ms.stat().unwrap_or_default().to_string(),
            },
            (None, None) => QuerySource::Expression(String::new()),
        },
    }
}

/// Who else uses the topic and the log group, for `uninstall --aws` in single-box mode.
pub async fn observe_sharing(
    c: &Clients,
    config: &Config,
    instance: &str,
    obs: &AwsObserved,
) -> Result<Sharing, AwsError> {
    let mut sharing = Sharing::default();
    let Some(aws) = config.aws.as_ref() else {
        return Ok(sharing);
    };
    if let Some(arn) = &obs.topic_arn {
        sharing.topic_users = describe_alarms(c, None)
            .await?
            .into_iter()
            .filter(|a| !obs.alarms.contains_key(&a.name) && a.actions.contains(arn))
            .map(|a| a.name)
            .collect();
    }
    if obs.log_group.is_some() {
        let mut token = None;
        loop {
            let page = c
                .logs
                .describe_log_streams()
                .log_group_name(&aws.log_group)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| explain("DescribeLogStreams", "logs:DescribeLogStreams", e))?;
            sharing.other_streams.extend(
                page.log_streams()
                    .iter()
                    .filter_map(|s| s.log_stream_name())
                    .filter(|n| *n != pmguard_agent::aws::names::stream_name(instance))
                    .map(str::to_string),
            );
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
    }
    Ok(sharing)
}

/// Every step that converges AWS to the config (pure).
pub fn plan(
    config: &Config,
    instance: &str,
    region: &str,
    obs: &AwsObserved,
) -> Result<Vec<AwsStep>, crate::Error> {
    let Some(aws) = config.aws.as_ref() else {
        return Err(crate::Error::NoAwsSection);
    };
    let mut steps = Vec::new();
    let topic_arn = plan_topic(aws, obs, &mut steps);
    plan_log_group(aws, obs, &mut steps);
    plan_alarms(config, instance, topic_arn.as_deref(), obs, &mut steps)?;
    plan_dashboard(config, instance, region, obs, &mut steps);
    Ok(steps)
}

/// The topic (created when missing) and the email subscription; returns the topic's ARN, or a
/// placeholder for one about to be created, for the alarms' actions.
fn plan_topic(aws: &AwsConfig, obs: &AwsObserved, steps: &mut Vec<AwsStep>) -> Option<String> {
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
    topic_arn
}

/// The log group and its retention.
fn plan_log_group(aws: &AwsConfig, obs: &AwsObserved, steps: &mut Vec<AwsStep>) {
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
}

/// Every alarm the config asks for (validated first) that is missing or differs, and every
/// alarm of ours it no longer asks for.
fn plan_alarms(
    config: &Config,
    instance: &str,
    topic_arn: Option<&str>,
    obs: &AwsObserved,
    steps: &mut Vec<AwsStep>,
) -> Result<(), crate::Error> {
    let desired = match config.aws.as_ref().and_then(|a| a.fleet.as_deref()) {
        Some(_) => {
            let desired = fleet::desired(config, topic_arn);
            fleet::validate_fleet(config, &desired, obs.other_insights_alarms)?;
            desired
        }
        None => alarms::desired(config, instance, topic_arn),
    };
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
    Ok(())
}

/// The dashboard, put when its body differs from what is there.
fn plan_dashboard(
    config: &Config,
    instance: &str,
    region: &str,
    obs: &AwsObserved,
    steps: &mut Vec<AwsStep>,
) {
    let (name, built) = match config.aws.as_ref().and_then(|a| a.fleet.as_deref()) {
        Some(f) => (
            fleet::dashboard_name(f),
            dashboard::build_fleet(config, region),
        ),
        None => (
            dashboard::name(instance),
            dashboard::build(config, instance, region),
        ),
    };
    if let Some(d) = built {
        let body = dashboard::to_json(&d);
        let want: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if obs.dashboard.as_ref() != Some(&want) {
            steps.push(AwsStep::PutDashboard {
                name,
                body,
                exists: obs.dashboard.is_some(),
            });
        }
    }
}

/// `uninstall --aws` on one box: what belongs to this box alone, and why the rest stays.
///
/// Fleet mode: nothing (an instance owns no AWS resource but its log stream, which the fleet's
/// log group keeps for its retention; the agent's role may not delete anything). Single-box
/// mode: this instance's alarms and dashboard; the topic only when no other alarm notifies it,
/// the log group only when no other instance has a stream in it.
pub fn plan_removal(
    config: &Config,
    instance: &str,
    obs: &AwsObserved,
    sharing: &Sharing,
) -> (Vec<AwsStep>, Vec<String>) {
    let mut notes = Vec::new();
    let Some(aws) = config.aws.as_ref() else {
        return (Vec::new(), notes);
    };
    if let Some(f) = aws.fleet.as_deref() {
        notes.push(format!(
            "fleet {f}: this box owns no shared resource; the topic, the log group {} (with this box's stream {instance}, kept for {} days), the fleet's alarms and its dashboard stay. `pmguard provision-aws --destroy` (admin) removes the fleet.",
            aws.log_group, aws.log_retention_days
        ));
        return (Vec::new(), notes);
    }
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
        if sharing.topic_users.is_empty() {
            steps.push(AwsStep::DeleteTopic { arn: arn.clone() });
        } else {
            notes.push(format!(
                "keep SNS topic {arn}: {} other alarm(s) notify it ({})",
                sharing.topic_users.len(),
                sharing.topic_users.join(", ")
            ));
        }
    }
    if obs.log_group.is_some() {
        if sharing.other_streams.is_empty() {
            steps.push(AwsStep::DeleteLogGroup {
                name: aws.log_group.clone(),
            });
        } else {
            notes.push(format!(
                "keep log group {}: other instances write to it ({})",
                aws.log_group,
                sharing.other_streams.join(", ")
            ));
        }
    }
    (steps, notes)
}

/// `provision-aws --destroy`: everything the config owns (in fleet mode: the fleet's alarms and
/// dashboard, its topic and its log group with every instance's stream).
pub fn plan_destroy(config: &Config, instance: &str, obs: &AwsObserved) -> Vec<AwsStep> {
    let Some(aws) = config.aws.as_ref() else {
        return Vec::new();
    };
    let mut steps: Vec<AwsStep> = obs
        .alarms
        .keys()
        .map(|n| AwsStep::DeleteAlarm { name: n.clone() })
        .collect();
    if obs.dashboard.is_some() {
        steps.push(AwsStep::DeleteDashboard {
            name: match aws.fleet.as_deref() {
                Some(f) => fleet::dashboard_name(f),
                None => dashboard::name(instance),
            },
        });
    }
    // The topic and the log group go only when their names are pmguard's own: a configured
    // `ops-alerts` topic or a shared `/aws/ec2/pm2-health` group may be other teams' too.
    if let Some(arn) = &obs.topic_arn {
        if arn.rsplit(':').next().is_some_and(owned_topic) {
            steps.push(AwsStep::DeleteTopic { arn: arn.clone() });
        }
    }
    if obs.log_group.is_some() && owned_log_group(&aws.log_group) {
        steps.push(AwsStep::DeleteLogGroup {
            name: aws.log_group.clone(),
        });
    }
    steps
}

/// Whether this config owns an alarm: it carries our mark (the fleet's marker, the instance's
/// exact InstanceId), or it has a name this config asks for and no mark of another owner (a
/// hand-edited alarm of ours lost its mark; fleet `web-api` app `v2` and fleet `web` app
/// `api-v2` make the same name, and the other fleet's marker says whose it is).
pub fn owns(spec: &AlarmSpec, wanted: &[String], fleet: Option<&str>, instance: &str) -> bool {
    let marked_ours = match fleet {
        Some(f) => fleet::owned_by_fleet(spec, f),
        None => alarms::owned_by_instance(spec, instance),
    };
    let marked_other = fleet::marker_fleet(&spec.description).is_some_and(|m| Some(m) != fleet)
        || spec
            .dimensions
            .iter()
            .any(|(k, v)| k == pmguard_agent::aws::names::DIM_INSTANCE_ID && v != instance);
    marked_ours || (wanted.contains(&spec.name) && !marked_other)
}

/// A topic pmguard named (`pmguard-...`), so it may delete it.
pub fn owned_topic(name: &str) -> bool {
    name.starts_with("pmguard-")
}

/// A log group pmguard named (`/pmguard/...`), so it may delete it.
pub fn owned_log_group(name: &str) -> bool {
    name.starts_with("/pmguard/")
}

/// What `plan_destroy` leaves standing, said to the person running it.
pub fn destroy_notes(config: &Config, obs: &AwsObserved) -> Vec<String> {
    let Some(aws) = config.aws.as_ref() else {
        return Vec::new();
    };
    let mut notes = Vec::new();
    if let Some(arn) = &obs.topic_arn {
        if !arn.rsplit(':').next().is_some_and(owned_topic) {
            notes.push(format!("note: topic {arn} is kept: its name is not one pmguard gives, so it may serve others; delete it yourself if nothing else uses it"));
        }
    }
    if obs.log_group.is_some() && !owned_log_group(&aws.log_group) {
        notes.push(format!("note: log group {} is kept: its name is not one pmguard gives, so other boxes or teams may write to it; delete it yourself if nothing else does", aws.log_group));
    }
    notes
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
            AwsStep::CreateTopic { name } => topic_arn = create_topic(c, name).await?,
            AwsStep::Subscribe { email } => {
                let arn = match &topic_arn {
                    Some(a) => a.clone(),
                    None => find_topic_arn(steps, c).await?,
                };
                subscribe(c, &arn, email).await?;
            }
            AwsStep::PutAlarm { spec, .. } => put_alarm(c, spec, topic_arn.as_deref()).await?,
            other => apply_independent(c, other).await?,
        }
    }
    Ok(calls)
}

async fn create_topic(c: &Clients, name: &str) -> Result<Option<String>, AwsError> {
    let out = c
        .sns
        .create_topic()
        .name(name)
        .send()
        .await
        .map_err(|e| explain("CreateTopic", "sns:CreateTopic", e))?;
    Ok(out.topic_arn().map(str::to_string))
}

async fn subscribe(c: &Clients, arn: &str, email: &str) -> Result<(), AwsError> {
    c.sns
        .subscribe()
        .topic_arn(arn)
        .protocol("email")
        .endpoint(email)
        .send()
        .await
        .map_err(|e| explain("Subscribe", "sns:Subscribe", e))?;
    Ok(())
}

/// PutMetricAlarm for `spec`, its topic placeholder replaced by the topic created in this run.
async fn put_alarm(c: &Clients, spec: &AlarmSpec, topic_arn: Option<&str>) -> Result<(), AwsError> {
    let actions: Vec<String> = spec
        .actions
        .iter()
        .map(|a| {
            if a == TOPIC_TO_CREATE {
                topic_arn.unwrap_or_default().to_string()
            } else {
                a.clone()
            }
        })
        .filter(|a| !a.is_empty())
        .collect();
    let mut req =
        c.cw.put_metric_alarm()
            .alarm_name(&spec.name)
            .alarm_description(&spec.description)
            .evaluation_periods(spec.evaluation_periods)
            .datapoints_to_alarm(spec.datapoints_to_alarm)
            .threshold(spec.threshold)
            .comparison_operator(ComparisonOperator::from(spec.comparison.as_str()))
            .treat_missing_data(&spec.treat_missing_data)
            .set_alarm_actions(Some(actions.clone()))
            .set_ok_actions(Some(actions));
    if spec.metrics.is_empty() {
        req = req
            .namespace(&spec.namespace)
            .metric_name(&spec.metric)
            .statistic(Statistic::from(spec.statistic.as_str()))
            .set_dimensions(Some(dimensions(&spec.dimensions)))
            .period(spec.period);
    } else {
        req = req.set_metrics(Some(spec.metrics.iter().map(to_sdk_query).collect()));
    }
    req.send()
        .await
        .map_err(|e| explain("PutMetricAlarm", "cloudwatch:PutMetricAlarm", e))?;
    Ok(())
}

/// The steps that need nothing from earlier steps: one call each.
async fn apply_independent(c: &Clients, step: &AwsStep) -> Result<(), AwsError> {
    match step {
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
        // These depend on the topic created earlier in the run: `apply` carries them out.
        AwsStep::CreateTopic { .. } | AwsStep::Subscribe { .. } | AwsStep::PutAlarm { .. } => {}
    }
    Ok(())
}

fn dimensions(pairs: &[(String, String)]) -> Vec<Dimension> {
    pairs
        .iter()
        .map(|(n, v)| Dimension::builder().name(n).value(v).build())
        .collect()
}

fn to_sdk_query(q: &MetricQuery) -> MetricDataQuery {
    let b = MetricDataQuery::builder()
        .id(&q.id)
        .label(&q.label)
        .return_data(q.return_data);
    match &q.source {
        // A Metrics Insights query takes its period; a math expression inherits its metrics'.
        QuerySource::Expression(e) if e.trim_start().to_ascii_uppercase().starts_with("SELECT") => {
            b.expression(e).period(q.period).build()
        }
        QuerySource::Expression(e) => b.expression(e).build(),
        QuerySource::Metric {
            namespace,
            name,
            dimensions: dims,
            stat,
        } => b
            .metric_stat(
                MetricStat::builder()
                    .metric(
                        Metric::builder()
                            .namespace(namespace)
                            .metric_name(name)
                            .set_dimensions(Some(dimensions(dims)))
                            .build(),
                    )
                    .period(q.period)
                    .stat(stat)
                    .build(),
            )
            .build(),
    }
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
    #[test]
    fn access_denied_is_told_apart_from_other_failures() {
        let e = |detail: &str| AwsError {
            call: "DescribeAlarms",
            detail: detail.into(),
            fix: String::new(),
        };
        assert!(
            e("AccessDenied: User is not authorized (IAM action cloudwatch:DescribeAlarms)")
                .access_denied()
        );
        assert!(e("AccessDeniedException: no (IAM action logs:DescribeLogGroups)").access_denied());
        assert!(!e("Throttling: slow down (IAM action cloudwatch:DescribeAlarms)").access_denied());
        assert!(!e("dispatch failure (IAM action cloudwatch:DescribeAlarms)").access_denied());
    }

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
        let (removal, _) = plan_removal(&c, "i-2", &AwsObserved::default(), &Sharing::default());
        assert!(removal.is_empty());
    }

    fn fleet_config() -> Config {
        Config::parse(
            Path::new("/c.toml"),
            "[[apps]]\nname = \"codebox\"\n[aws]\nfleet = \"web\"\nalarm_email = \"ops@example.com\"\n",
        )
        .unwrap()
    }

    fn provisioned_fleet(c: &Config) -> AwsObserved {
        let arn = "arn:aws:sns:us-east-1:1:pmguard-web-alerts".to_string();
        let mut obs = AwsObserved {
            topic_arn: Some(arn.clone()),
            log_group: Some(Some(30)),
            ..AwsObserved::default()
        };
        obs.subscriptions.insert(
            "ops@example.com".into(),
            "arn:aws:sns:us-east-1:1:x:y".into(),
        );
        for a in fleet::desired(c, Some(&arn)) {
            obs.alarms.insert(a.name.clone(), a);
        }
        obs.dashboard = serde_json::from_str(&dashboard::to_json(
            &dashboard::build_fleet(c, "us-east-1").unwrap(),
        ))
        .ok();
        obs
    }

    #[test]
    fn a_fleet_plan_creates_the_shared_resources_once_and_nothing_per_instance() {
        let c = fleet_config();
        let steps = plan(&c, "i-1", "us-east-1", &AwsObserved::default()).unwrap();
        let shown = display(&steps, &AwsObserved::default(), &c);
        insta::assert_snapshot!("provision_fleet_fresh_plan", shown);
        // The instance does not appear in anything the fleet plan creates.
        assert!(!shown.contains("i-1"), "{shown}");
        assert_eq!(
            plan(&c, "i-2", "us-east-1", &AwsObserved::default()).unwrap(),
            steps
        );
        let obs = provisioned_fleet(&c);
        assert!(plan(&c, "i-1", "us-east-1", &obs).unwrap().is_empty());
    }

    #[test]
    fn uninstall_on_a_fleet_box_removes_nothing_shared() {
        let c = fleet_config();
        let obs = provisioned_fleet(&c);
        let (steps, notes) = plan_removal(&c, "i-1", &obs, &Sharing::default());
        assert!(steps.is_empty(), "{steps:?}");
        assert!(notes[0].contains("provision-aws --destroy"), "{notes:?}");
    }

    #[test]
    fn destroy_lists_every_fleet_resource() {
        let c = fleet_config();
        let obs = provisioned_fleet(&c);
        let steps = plan_destroy(&c, "i-1", &obs);
        let shown = display(&steps, &obs, &c);
        insta::assert_snapshot!("provision_fleet_destroy_plan", shown);
    }

    #[test]
    fn a_name_we_want_with_another_owners_mark_is_not_ours() {
        // Fleet `web` app `api-v2` and fleet `web-api` app `v2` make the same alarm name.
        let other = Config::parse(
            Path::new("/c.toml"),
            "[[apps]]\nname = \"v2\"\n[aws]\nfleet = \"web-api\"\n",
        )
        .unwrap();
        let ours = Config::parse(
            Path::new("/c.toml"),
            "[[apps]]\nname = \"api-v2\"\n[aws]\nfleet = \"web\"\n",
        )
        .unwrap();
        let theirs = fleet::desired(&other, None);
        let wanted: Vec<String> = fleet::desired(&ours, None)
            .into_iter()
            .map(|a| a.name)
            .collect();
        let clash = theirs.iter().find(|a| wanted.contains(&a.name));
        let clash = clash.expect("the two fleets' names collide");
        assert!(!owns(clash, &wanted, Some("web"), "i-1"));
        assert!(owns(clash, &wanted, Some("web-api"), "i-1"));
        // A hand-edited alarm of ours (its mark gone) is still ours by its exact name.
        let mut edited = clash.clone();
        edited.description = "edited by hand".into();
        assert!(owns(&edited, &wanted, Some("web"), "i-1"));
        // Single box: our name, another instance's InstanceId.
        let mut single = edited.clone();
        single.dimensions = vec![("InstanceId".into(), "web-prod".into())];
        assert!(!owns(&single, &wanted, None, "web"));
    }

    #[test]
    fn destroy_keeps_a_topic_and_log_group_pmguard_did_not_name() {
        let mut c = fleet_config();
        let aws = c.aws.as_mut().unwrap();
        aws.sns_topic = Some("ops-alerts".into());
        aws.log_group = "/shared/app-logs".into();
        let mut obs = provisioned_fleet(&c);
        obs.topic_arn = Some("arn:aws:sns:us-east-1:1:ops-alerts".into());
        let steps = plan_destroy(&c, "i-1", &obs);
        assert!(
            !steps.iter().any(|s| matches!(
                s,
                AwsStep::DeleteTopic { .. } | AwsStep::DeleteLogGroup { .. }
            )),
            "{steps:?}"
        );
        let notes = destroy_notes(&c, &obs).join("\n");
        assert!(notes.contains("ops-alerts is kept"), "{notes}");
        assert!(notes.contains("/shared/app-logs is kept"), "{notes}");
    }

    #[test]
    fn uninstall_on_one_box_keeps_what_another_box_uses() {
        let c = config();
        let arn = "arn:aws:sns:us-east-1:1:alerts".to_string();
        let mut obs = AwsObserved {
            topic_arn: Some(arn.clone()),
            log_group: Some(Some(30)),
            ..AwsObserved::default()
        };
        for a in alarms::desired(&c, "web", Some(&arn)) {
            obs.alarms.insert(a.name.clone(), a);
        }
        let sharing = Sharing {
            topic_users: vec!["pmguard-web-2-codebox-service-down".into()],
            other_streams: vec!["web-2".into()],
        };
        let (steps, notes) = plan_removal(&c, "web", &obs, &sharing);
        assert_eq!(steps.len(), 4, "the four alarms only: {steps:?}");
        assert!(steps.iter().all(
            |s| matches!(s, AwsStep::DeleteAlarm { name } if name.starts_with("pmguard-web-"))
        ));
        assert!(notes[0].starts_with("keep SNS topic"), "{notes:?}");
        assert!(notes[1].contains("web-2"), "{notes:?}");
        let (steps, notes) = plan_removal(&c, "web", &obs, &Sharing::default());
        assert_eq!(steps.len(), 6);
        assert!(notes.is_empty());
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
