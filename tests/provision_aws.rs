//! `pmguard provision-aws` and `pmguard uninstall --aws` against ministack on 127.0.0.1, with a
//! counting proxy in between so "a second run makes no mutating call" is observed on the wire.

#[path = "../agent/tests/aws_common/mod.rs"]
mod aws_common;
#[path = "../agent/tests/common/mod.rs"]
mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::path::Path;
use std::process::{Command, Output};

use aws_common::Ministack;
use proxy::{mutating, CountingProxy};

const PMGUARD: &str = env!("CARGO_BIN_EXE_pmguard");

fn config(dir: &Path, apps: &[&str], extra: &str) -> std::path::PathBuf {
    let mut text = String::new();
    for a in apps {
        text +=
            &format!("[[apps]]\nname = \"{a}\"\nhealth_url = \"http://127.0.0.1:5000/health\"\n\n");
    }
    text += &format!("[aws]\nregion = \"us-east-1\"\nsns_topic = \"pmguard-alerts\"\nalarm_email = \"ops@example.com\"\ninstance_id = \"i-0test\"\n{extra}");
    let p = dir.join("pmguard.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn run(endpoint: &str, ms: &Ministack, args: &[&str]) -> Output {
    let mut cmd = Command::new(PMGUARD);
    cmd.args(args);
    for (k, v) in ms.env() {
        cmd.env(k, v);
    }
    aws_common::assert_loopback(endpoint);
    cmd.env("AWS_ENDPOINT_URL", endpoint);
    cmd.output().unwrap()
}

fn stdout(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn alarm_names(ms: &Ministack) -> Vec<String> {
    let cw = aws_sdk_cloudwatch::Client::new(&ms.sdk_config());
    let out = aws_common::rt()
        .block_on(cw.describe_alarms().alarm_name_prefix("pmguard-").send())
        .unwrap();
    let mut v: Vec<String> = out
        .metric_alarms()
        .iter()
        .filter_map(|a| a.alarm_name().map(String::from))
        .collect();
    v.sort();
    v
}

#[test]
fn provision_converges_and_a_second_run_changes_nothing() {
    let ms = Ministack::start();
    let proxy = CountingProxy::start(ms.port);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &["codebox", "worker"], "");
    let c = cfg.to_str().unwrap();

    let o = run(
        &proxy.endpoint(),
        &ms,
        &["provision-aws", "--config", c, "--dry-run"],
    );
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("create alarm pmguard-i-0test-codebox-service-down"),
        "{}",
        stdout(&o)
    );
    assert!(
        mutating(&proxy.take()).is_empty(),
        "--dry-run changed something"
    );
    assert!(alarm_names(&ms).is_empty());

    let o = run(&proxy.endpoint(), &ms, &["provision-aws", "--config", c]);
    assert!(o.status.success(), "{}", stdout(&o));
    let first = mutating(&proxy.take());
    assert!(
        first.contains(&"CreateTopic".to_string()) && first.contains(&"Subscribe".to_string()),
        "{first:?}"
    );
    assert_eq!(first.iter().filter(|o| *o == "PutMetricAlarm").count(), 7);
    assert_eq!(alarm_names(&ms).len(), 7);

    let o = run(&proxy.endpoint(), &ms, &["provision-aws", "--config", c]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("Nothing to do."), "{}", stdout(&o));
    let second = proxy.take();
    assert!(
        mutating(&second).is_empty(),
        "second run made mutating calls: {second:?}"
    );
    assert!(!second.is_empty(), "the second run observed nothing?");
}

#[test]
fn a_changed_threshold_updates_exactly_that_alarm_and_a_removed_app_loses_its_alarms() {
    let ms = Ministack::start();
    let proxy = CountingProxy::start(ms.port);
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), &["codebox", "worker"], "");
    assert!(run(
        &proxy.endpoint(),
        &ms,
        &["provision-aws", "--config", c.to_str().unwrap()]
    )
    .status
    .success());
    proxy.take();

    let c = config(dir.path(), &["codebox", "worker"], "alarm_failures = 5\n");
    let o = run(
        &proxy.endpoint(),
        &ms,
        &["provision-aws", "--config", c.to_str().unwrap()],
    );
    let text = stdout(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("update alarm pmguard-i-0test-codebox-high-error-rate\n"),
        "{text}"
    );
    assert!(text.contains("    threshold: 3 -> 5\n"), "{text}");
    assert_eq!(
        text.matches("update alarm").count(),
        2,
        "only the two error-rate alarms: {text}"
    );
    assert!(
        !text.contains("create ") && !text.contains("delete "),
        "{text}"
    );
    assert!(
        text.contains("update alarm pmguard-i-0test-worker-high-error-rate"),
        "{text}"
    );
    assert_eq!(
        mutating(&proxy.take()),
        ["PutMetricAlarm", "PutMetricAlarm"]
    );

    let c = config(dir.path(), &["codebox"], "alarm_failures = 5\n");
    let o = run(
        &proxy.endpoint(),
        &ms,
        &["provision-aws", "--config", c.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stdout(&o));
    let ops = mutating(&proxy.take());
    assert_eq!(
        ops.iter().filter(|o| *o == "DeleteAlarms").count(),
        3,
        "{ops:?}"
    );
    assert!(
        ops.contains(&"PutDashboard".to_string()),
        "the dashboard loses the app too: {ops:?}"
    );
    let left = alarm_names(&ms);
    assert!(left.iter().all(|n| !n.contains("worker")), "{left:?}");
    assert_eq!(left.len(), 4);
}

#[test]
fn uninstall_aws_removes_everything_provisioned_and_nothing_else() {
    let ms = Ministack::start();
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), &["codebox"], "");
    let ep = ms.endpoint();
    assert!(run(
        &ep,
        &ms,
        &["provision-aws", "--config", c.to_str().unwrap()]
    )
    .status
    .success());
    // Someone else's alarm, in the same account: must survive.
    let cw = aws_sdk_cloudwatch::Client::new(&ms.sdk_config());
    aws_common::rt()
        .block_on(
            cw.put_metric_alarm()
                .alarm_name("billing-high")
                .metric_name("EstimatedCharges")
                .namespace("Billing")
                .statistic(aws_sdk_cloudwatch::types::Statistic::Maximum)
                .period(3600)
                .evaluation_periods(1)
                .threshold(100.0)
                .comparison_operator(
                    aws_sdk_cloudwatch::types::ComparisonOperator::GreaterThanThreshold,
                )
                .send(),
        )
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let o = run(
        &ep,
        &ms,
        &[
            "uninstall",
            "--root",
            root.path().to_str().unwrap(),
            "--aws",
            "--config",
            c.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(alarm_names(&ms).is_empty());
    let all = aws_common::rt()
        .block_on(cw.describe_alarms().send())
        .unwrap();
    assert_eq!(all.metric_alarms().len(), 1, "billing-high must remain");
    let o = run(
        &ep,
        &ms,
        &[
            "provision-aws",
            "--config",
            c.to_str().unwrap(),
            "--dry-run",
        ],
    );
    assert!(
        stdout(&o).contains("create SNS topic pmguard-alerts"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("create log group"), "{}", stdout(&o));
}

#[test]
fn aws_unreachable_names_the_call_and_the_fix() {
    let ms = Ministack::start();
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), &["codebox"], "");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = run(
        &format!("http://127.0.0.1:{closed}"),
        &ms,
        &["provision-aws", "--config", c.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(2));
    let text = stdout(&o);
    assert!(text.contains("ListTopics failed"), "{text}");
    assert!(text.contains("fix: cannot reach AWS"), "{text}");
}
