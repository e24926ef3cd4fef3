//! The names pmguard uses in AWS: metric and dimension names, defaults, and the exact IAM
//! actions the agent's sink calls.
//!
//! The installer renders the IAM policy and the alarms from these constants, so what the agent
//! sends and what the installer grants and watches can never drift apart.

/// 1 per passing check, 0 per failing one (Average = share of healthy checks).
pub const SERVICE_STATUS: &str = "ServiceStatus";
/// Failed checks (Sum).
pub const HEALTH_CHECK_FAILURES: &str = "HealthCheckFailures";
/// Restarts: by pmguard and by PM2 itself as noticed by the agent (Sum).
pub const SERVICE_RESTARTS: &str = "ServiceRestarts";
/// HTTP probe latency, milliseconds.
pub const RESPONSE_TIME: &str = "ResponseTime";
/// Days until the certificate of the app's https probes expires (the soonest; Minimum).
pub const CERT_EXPIRY_DAYS: &str = "CertExpiryDays";
/// CPU of the app's processes, % of one core (summed over cluster workers).
pub const CPU_PERCENT: &str = "CpuPercent";
/// RSS of the app's processes, bytes (summed over cluster workers).
pub const MEMORY_BYTES: &str = "MemoryBytes";
/// 1 per flush while the agent runs (dimension InstanceId only): the dead-man's switch.
pub const AGENT_HEARTBEAT: &str = "AgentHeartbeat";
/// Datapoints and events the agent had to drop because its buffer overflowed while AWS was
/// unreachable (dimension InstanceId only). Sent only when non-zero.
pub const DROPPED_DATAPOINTS: &str = "DroppedDatapoints";

/// Every metric name the agent may send.
pub const METRICS: &[&str] = &[
    SERVICE_STATUS,
    HEALTH_CHECK_FAILURES,
    SERVICE_RESTARTS,
    RESPONSE_TIME,
    CERT_EXPIRY_DAYS,
    CPU_PERCENT,
    MEMORY_BYTES,
    AGENT_HEARTBEAT,
    DROPPED_DATAPOINTS,
];

/// Dimension: the PM2 app name.
pub const DIM_APP: &str = "App";
/// Dimension: the EC2 instance id (IMDSv2), or the host name off EC2, or `[aws] instance_id`.
pub const DIM_INSTANCE_ID: &str = "InstanceId";
/// Dimension (fleet mode only): the `[aws] fleet` name. App metrics carry App + Fleet +
/// InstanceId, so one namespace can hold several fleets and a Metrics Insights query can select
/// one; the heartbeat is also sent with Fleet alone, so its SampleCount counts the reporting
/// instances.
pub const DIM_FLEET: &str = "Fleet";

/// The name an instance goes by in AWS (its `InstanceId` dimension and the alarms named after
/// it), for an id from the config, IMDS or the host name: the id itself when CloudWatch accepts
/// it as a dimension value, else the id with every byte it refuses percent-encoded (UTF-8):
/// `höst` -> `h%C3%B6st`.
///
/// Why encode rather than refuse or drop: every datum carries the InstanceId, so a name AWS
/// refuses would make it refuse every metric of the box. The encoded name is printable ASCII.
/// Refused bytes: anything but printable ASCII; `%` is encoded too once anything is. An id that
/// was printable ASCII before (`db:primary`, `50%`) is sent unchanged, so an upgrade never renames
/// a box's dimension and orphans its alarms. An id that is empty or only spaces is returned as
/// is: no encoding makes it acceptable (the config refuses it).
pub fn instance_name(id: &str) -> std::borrow::Cow<'_, str> {
    encode(id, |b| !(0x20..0x7f).contains(&b))
}

/// The instance's log stream: `instance_name` with `:` and `*` also encoded (CloudWatch Logs
/// refuses them in a stream name; a dimension value takes them): `web:1` -> `web%3A1`.
pub fn stream_name(instance: &str) -> std::borrow::Cow<'_, str> {
    encode(instance, |b| {
        !(0x20..0x7f).contains(&b) || b == b':' || b == b'*'
    })
}

fn encode(id: &str, refused: impl Fn(u8) -> bool) -> std::borrow::Cow<'_, str> {
    if !id.bytes().any(&refused) {
        return id.into();
    }
    let mut out = String::with_capacity(id.len() * 3);
    for b in id.bytes() {
        if refused(b) || b == b'%' {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out.into()
}

pub const DEFAULT_NAMESPACE: &str = "PM2/CodeBox";
pub const DEFAULT_LOG_GROUP: &str = "/aws/ec2/pm2-health";
pub const DEFAULT_LOG_RETENTION_DAYS: u32 = 30;

/// The only retention periods CloudWatch Logs accepts (PutRetentionPolicy).
pub const LOG_RETENTION_DAYS: &[u32] = &[
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922,
    3288, 3653,
];

/// The IAM actions the agent's sink calls, and nothing else.
///
/// - `cloudwatch:PutMetricData`: Resource `*`, scope it with the `cloudwatch:namespace` condition.
/// - `logs:CreateLogGroup`, `logs:PutRetentionPolicy`: only when the group is missing.
/// - `logs:CreateLogStream`, `logs:PutLogEvents`: the instance's stream in the group.
/// - `sns:CreateTopic` (resolves the topic name to its ARN; idempotent), `sns:Publish`.
pub const AGENT_IAM_ACTIONS: &[&str] = &[
    "cloudwatch:PutMetricData",
    "logs:CreateLogGroup",
    "logs:CreateLogStream",
    "logs:PutLogEvents",
    "logs:PutRetentionPolicy",
    "sns:CreateTopic",
    "sns:Publish",
];

/// The IAM actions the agent's sink calls in fleet mode, and nothing else: it creates nothing
/// shared (the log group and the topic are provision-aws's), only its own log stream.
///
/// - `cloudwatch:PutMetricData`: Resource `*`, scoped with the `cloudwatch:namespace` condition.
/// - `logs:CreateLogStream`, `logs:PutLogEvents`: the instance's stream in the fleet's group.
/// - `sns:Publish` on the fleet's topic. The topic's ARN is built from `sts:GetCallerIdentity`,
///   which needs no IAM permission.
pub const FLEET_AGENT_IAM_ACTIONS: &[&str] = &[
    "cloudwatch:PutMetricData",
    "logs:CreateLogStream",
    "logs:PutLogEvents",
    "sns:Publish",
];

/// The IAM actions the agent needs for a given config: SNS only when a topic is set; the fleet
/// list in fleet mode.
pub fn agent_iam_actions(with_sns: bool, fleet: bool) -> Vec<&'static str> {
    let all = if fleet {
        FLEET_AGENT_IAM_ACTIONS
    } else {
        AGENT_IAM_ACTIONS
    };
    all.iter()
        .copied()
        .filter(|a| with_sns || !a.starts_with("sns:"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_are_sorted_by_service_and_sns_is_optional() {
        assert_eq!(agent_iam_actions(true, false), AGENT_IAM_ACTIONS);
        let without = agent_iam_actions(false, false);
        assert!(without.iter().all(|a| !a.starts_with("sns:")));
        assert_eq!(without.len(), AGENT_IAM_ACTIONS.len() - 2);
        assert_eq!(agent_iam_actions(true, true), FLEET_AGENT_IAM_ACTIONS);
        assert_eq!(agent_iam_actions(false, true).len(), 3);
        assert!(METRICS.iter().all(|m| !m.is_empty() && m.len() <= 255));
    }

    /// `sns:CreateTopic` -> `"CreateTopic"`: the operation of an IAM action, as the sink's
    /// client names it (an awsquery `Action` or a JSON `X-Amz-Target` operation).
    fn operation(action: &str) -> String {
        format!("\"{}\"", action.split(':').nth(1).unwrap())
    }

    #[test]
    fn the_lists_name_every_call_the_sink_makes() {
        let sink = include_str!("sink.rs");
        let calls = |a: &str| sink.contains(&operation(a));
        for a in AGENT_IAM_ACTIONS.iter().chain(FLEET_AGENT_IAM_ACTIONS) {
            assert!(calls(a), "{a} is listed but the sink never calls it");
        }
        // Calls the sink must never make, and the one it makes that needs no permission.
        for a in [
            "cloudwatch:PutMetricAlarm",
            "cloudwatch:DeleteAlarms",
            "logs:DeleteLogGroup",
            "logs:DeleteLogStream",
            "sns:Subscribe",
            "sns:DeleteTopic",
        ] {
            assert!(!calls(a), "the sink calls {a}");
        }
        assert!(calls("sts:GetCallerIdentity"));
        assert_eq!(
            operation("logs:PutRetentionPolicy"),
            "\"PutRetentionPolicy\""
        );
    }

    #[test]
    fn an_instance_id_aws_refuses_is_sent_percent_encoded_and_an_accepted_one_as_is() {
        assert_eq!(instance_name("i-0123456789abcdef0"), "i-0123456789abcdef0");
        assert_eq!(instance_name("web 1 (50%)"), "web 1 (50%)");
        assert_eq!(instance_name("höst"), "h%C3%B6st");
        // Printable ASCII stays as it was sent before encoding existed (the alarms carry it).
        assert_eq!(instance_name("web:1*"), "web:1*");
        assert_eq!(stream_name("web:1*"), "web%3A1%2A");
        assert_eq!(stream_name("i-0123456789abcdef0"), "i-0123456789abcdef0");
        assert_eq!(instance_name("a%b\u{7}"), "a%25b%07");
        assert_eq!(instance_name("应用"), "%E5%BA%94%E7%94%A8");
        for id in ["höst", "web:1", "应用", "tab\there"] {
            let name = instance_name(id);
            assert!(
                crate::aws::metrics::dimension_value_ok(&name)
                    && !stream_name(&name).contains([':', '*']),
                "{name}"
            );
        }
    }

    #[test]
    fn a_fleet_agent_creates_nothing_shared_and_deletes_nothing() {
        for a in FLEET_AGENT_IAM_ACTIONS {
            let verb = a.split(':').nth(1).unwrap();
            assert!(
                !verb.starts_with("Delete")
                    && verb != "Subscribe"
                    && verb != "CreateTopic"
                    && verb != "CreateLogGroup"
                    && !verb.contains("Alarm"),
                "{a}"
            );
        }
    }
}
