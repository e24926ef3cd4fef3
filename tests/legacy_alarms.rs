//! `pmguard provision-aws` and the old monitor's alarms (`PM2-CodeBox-Service-Down`,
//! `-High-Error-Rate`, `-Frequent-Restarts`), against ministack on 127.0.0.1: listed on every run,
//! deleted only with `--remove-legacy-alarms` (and not under `--dry-run`); other alarms and
//! pmguard's own are never touched.

#[path = "../agent/tests/aws_common/mod.rs"]
mod aws_common;
#[path = "../agent/tests/common/mod.rs"]
mod common;

use std::process::{Command, Output};

use aws_common::Ministack;
use aws_sdk_cloudwatch::types::{ComparisonOperator, Statistic};

const PMGUARD: &str = env!("CARGO_BIN_EXE_pmguard");
const OLD: [&str; 3] = [
    "PM2-CodeBox-Frequent-Restarts",
    "PM2-CodeBox-High-Error-Rate",
    "PM2-CodeBox-Service-Down",
];

fn all_alarms(cw: &aws_sdk_cloudwatch::Client) -> Vec<String> {
    let out = aws_common::rt()
        .block_on(cw.describe_alarms().send())
        .unwrap();
    let mut v: Vec<String> = out
        .metric_alarms()
        .iter()
        .filter_map(|a| a.alarm_name().map(String::from))
        .collect();
    v.sort();
    v
}

fn provision(ms: &Ministack, config: &std::path::Path, extra: &[&str]) -> String {
    let endpoint = ms.endpoint();
    aws_common::assert_loopback(&endpoint);
    let mut cmd = Command::new(PMGUARD);
    cmd.args(["provision-aws", "--config"])
        .arg(config)
        .args(extra);
    for (k, v) in ms.env() {
        cmd.env(k, v);
    }
    let o: Output = cmd.env("AWS_ENDPOINT_URL", endpoint).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{text}");
    text
}

#[test]
fn old_alarms_are_listed_and_deleted_only_when_asked() {
    let ms = Ministack::start();
    let cw = aws_sdk_cloudwatch::Client::new(&ms.sdk_config());
    // Another team's alarms with the seed's endings must survive --remove-legacy-alarms.
    for name in OLD
        .iter()
        .chain(&["billing-over-100", "Payments-API-Service-Down"])
    {
        aws_common::rt()
            .block_on(
                cw.put_metric_alarm()
                    .alarm_name(*name)
                    .namespace("PM2/CodeBox")
                    .metric_name("ServiceUp")
                    .statistic(Statistic::Average)
                    .period(60)
                    .evaluation_periods(1)
                    .threshold(1.0)
                    .comparison_operator(ComparisonOperator::LessThanThreshold)
                    .send(),
            )
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pmguard.toml");
    std::fs::write(
        &config,
        "[[apps]]\nname = \"codebox\"\nhealth_url = \"http://127.0.0.1:5000/health\"\n\n[aws]\nregion = \"us-east-1\"\ninstance_id = \"i-0test\"\n",
    )
    .unwrap();

    let out = provision(&ms, &config, &[]);
    for name in OLD {
        assert!(
            out.contains(&format!("note: old monitor's alarm {name} is still there")),
            "{out}"
        );
    }
    assert!(!out.contains("billing-over-100"), "{out}");
    assert!(!out.contains("Payments-API-Service-Down"), "{out}");
    let after_first = all_alarms(&cw);
    assert!(OLD.iter().all(|n| after_first.contains(&n.to_string())));
    assert!(after_first
        .iter()
        .any(|n| n.starts_with("pmguard-i-0test-")));

    let out = provision(&ms, &config, &["--remove-legacy-alarms", "--dry-run"]);
    assert!(
        out.contains("delete old alarm PM2-CodeBox-Service-Down"),
        "{out}"
    );
    assert_eq!(all_alarms(&cw), after_first, "--dry-run deleted something");

    let out = provision(&ms, &config, &["--remove-legacy-alarms"]);
    assert!(out.contains("Deleted 3 old alarm(s)."), "{out}");
    let left = all_alarms(&cw);
    assert!(
        OLD.iter().all(|n| !left.contains(&n.to_string())),
        "{left:?}"
    );
    let expected: Vec<String> = after_first
        .into_iter()
        .filter(|n| !OLD.contains(&n.as_str()))
        .collect();
    assert_eq!(left, expected, "only the old monitor's alarms go");
    assert!(left.contains(&"billing-over-100".to_string()));
}
