//! Fleet mode against ministack on 127.0.0.1, with the counting proxy in between: two real agents
//! (instance ids `web` and `web-2`, one a name prefix of the other) in one fleet, watching a real
//! PM2 app; provision-aws once for the fleet; `uninstall --aws` on one box; `--destroy`; the
//! config through SSM Parameter Store; and single-box ownership by exact InstanceId.
//!
//! Fails closed like the other AWS tests: no ministack, no test; loopback endpoints only.

#[path = "../agent/tests/aws_common/mod.rs"]
mod aws_common;
#[path = "../agent/tests/common/mod.rs"]
mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use aws_common::{rt, Ministack};
use common::{free_port, wait_until, Pm2Sandbox};
use proxy::{mutating, CountingProxy};

const PMGUARD: &str = env!("CARGO_BIN_EXE_pmguard");
const NS: &str = "PM2/FleetTest";

fn agent_bin() -> PathBuf {
    let p = Path::new(PMGUARD).with_file_name("pmguard-agent");
    assert!(
        p.exists(),
        "{} is missing: run the suite with `cargo test --workspace`",
        p.display()
    );
    p
}

fn run(endpoint: &str, ms: &Ministack, args: &[&str]) -> Output {
    let mut cmd = Command::new(PMGUARD);
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in ms.env() {
        cmd.env(k, v);
    }
    aws_common::assert_loopback(endpoint);
    cmd.env("AWS_ENDPOINT_URL", endpoint);
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: Output) -> String {
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    t
}

/// A fleet config; `instance` only for the agents' copies (one config per box otherwise).
fn fleet_config(dir: &Path, file: &str, fleet: &str, apps: &str, aws_extra: &str) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(
        &p,
        format!("{apps}\n[aws]\nregion = \"us-east-1\"\nnamespace = \"{NS}\"\nfleet = \"{fleet}\"\nalarm_email = \"ops@example.com\"\n{aws_extra}"),
    )
    .unwrap();
    p
}

fn all_alarms(ms: &Ministack) -> Vec<String> {
    let cw = aws_sdk_cloudwatch::Client::new(&ms.sdk_config());
    let out = rt().block_on(cw.describe_alarms().send()).unwrap();
    let mut v: Vec<String> = out
        .metric_alarms()
        .iter()
        .filter_map(|a| a.alarm_name().map(String::from))
        .collect();
    v.sort();
    v
}

fn topics(ms: &Ministack) -> Vec<String> {
    let sns = aws_sdk_sns::Client::new(&ms.sdk_config());
    let out = rt().block_on(sns.list_topics().send()).unwrap();
    let mut v: Vec<String> = out
        .topics()
        .iter()
        .filter_map(|t| t.topic_arn())
        .map(|a| a.rsplit(':').next().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn streams(ms: &Ministack, group: &str) -> Option<Vec<String>> {
    let logs = aws_sdk_cloudwatchlogs::Client::new(&ms.sdk_config());
    let out = rt()
        .block_on(logs.describe_log_streams().log_group_name(group).send())
        .ok()?;
    let mut v: Vec<String> = out
        .log_streams()
        .iter()
        .filter_map(|s| s.log_stream_name().map(String::from))
        .collect();
    v.sort();
    Some(v)
}

fn sample_count(ms: &Ministack, metric: &str, dims: &[(&str, &str)]) -> f64 {
    use aws_sdk_cloudwatch::types::{Dimension, Statistic};
    let cw = aws_sdk_cloudwatch::Client::new(&ms.sdk_config());
    let now = std::time::SystemTime::now();
    let out = rt()
        .block_on(
            cw.get_metric_statistics()
                .namespace(NS)
                .metric_name(metric)
                .set_dimensions(Some(
                    dims.iter()
                        .map(|(k, v)| Dimension::builder().name(*k).value(*v).build())
                        .collect(),
                ))
                .start_time((now - Duration::from_secs(3600)).into())
                .end_time((now + Duration::from_secs(3600)).into())
                .period(60)
                .statistics(Statistic::SampleCount)
                .send(),
        )
        .unwrap();
    out.datapoints()
        .iter()
        .map(|d| d.sample_count().unwrap_or(0.0))
        .sum()
}

/// A foreign alarm and topic in the same account: never ours to touch.
fn foreign_resources(ms: &Ministack) {
    let cfg = ms.sdk_config();
    let cw = aws_sdk_cloudwatch::Client::new(&cfg);
    let sns = aws_sdk_sns::Client::new(&cfg);
    rt().block_on(async {
        cw.put_metric_alarm()
            .alarm_name("pmguard-fleet-prod-billing")
            .alarm_description("someone else's, in our name space")
            .metric_name("EstimatedCharges")
            .namespace("Billing")
            .statistic(aws_sdk_cloudwatch::types::Statistic::Maximum)
            .period(3600)
            .evaluation_periods(1)
            .threshold(100.0)
            .comparison_operator(
                aws_sdk_cloudwatch::types::ComparisonOperator::GreaterThanThreshold,
            )
            .send()
            .await
            .unwrap();
        sns.create_topic()
            .name("billing-alerts")
            .send()
            .await
            .unwrap();
    });
}

struct Box_ {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Box_ {
    fn drop(&mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .ok();
        let _ = self.child.wait();
    }
}

/// One instance of the fleet: a real agent with its own state and instance id.
fn start_box(pm2: &Pm2Sandbox, endpoint: &str, ms: &Ministack, instance: &str, apps: &str) -> Box_ {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pmguard.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\ninterval = \"300ms\"\nstate_dir = \"{}\"\npm2_home = \"{}\"\n\n{apps}\n[aws]\nregion = \"us-east-1\"\nnamespace = \"{NS}\"\nfleet = \"prod\"\nflush_interval = \"1s\"\ninstance_id = \"{instance}\"\n",
            dir.path().join("state").display(),
            pm2.home().display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(agent_bin());
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap());
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in ms.env() {
        cmd.env(k, v);
    }
    aws_common::assert_loopback(endpoint);
    cmd.env("AWS_ENDPOINT_URL", endpoint);
    Box_ {
        child: cmd.spawn().unwrap(),
        _dir: dir,
    }
}

#[test]
fn a_fleet_is_provisioned_once_shared_by_its_boxes_and_destroyed_exactly() {
    let ms = Ministack::start();
    let proxy = CountingProxy::start(ms.port);
    let ep = proxy.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let apps = "[[apps]]\nname = \"web\"\n";
    let cfg = fleet_config(
        dir.path(),
        "prod.toml",
        "prod",
        apps,
        "auto_scaling_group = \"prod-asg\"\n",
    );
    let c = cfg.to_str().unwrap();
    foreign_resources(&ms);

    // Provision: the shared resources once, no instance named anywhere.
    let out = ok(run(&ep, &ms, &["provision-aws", "--config", c]));
    assert!(out.contains("AWS (us-east-1, fleet prod):"), "{out}");
    assert!(
        out.contains("create alarm pmguard-fleet-prod-web-service-down"),
        "{out}"
    );
    let first = proxy.take();
    // 5 reads (ListTopics, DescribeLogGroups, DescribeAlarms of the fleet and of the account,
    // GetDashboard), then 1 topic + 1 subscription + log group and retention + 4 alarms + 1
    // dashboard: docs/fleet.md counts from these.
    assert_eq!(first.len() - mutating(&first).len(), 5, "{first:?}");
    let first = mutating(&first);
    assert_eq!(first.len(), 9, "{first:?}");
    assert_eq!(
        first.iter().filter(|o| *o == "PutMetricAlarm").count(),
        4,
        "{first:?}"
    );
    let ours: Vec<String> = all_alarms(&ms)
        .into_iter()
        .filter(|a| a.starts_with("pmguard-fleet-prod-") && a != "pmguard-fleet-prod-billing")
        .collect();
    assert_eq!(
        ours,
        [
            "pmguard-fleet-prod-agents-missing",
            "pmguard-fleet-prod-web-frequent-restarts",
            "pmguard-fleet-prod-web-high-error-rate",
            "pmguard-fleet-prod-web-service-down",
        ]
    );

    // A second run makes no mutating call although the stand-in dropped the alarms' queries.
    let out = ok(run(&ep, &ms, &["provision-aws", "--config", c]));
    assert!(out.contains("Nothing to do."), "{out}");
    let second = proxy.take();
    assert!(mutating(&second).is_empty(), "{second:?}");
    assert_eq!(second.len(), 6, "{second:?}");

    // A neighbouring fleet whose name has ours as a prefix.
    let other = fleet_config(dir.path(), "prod-2.toml", "prod-2", apps, "");
    ok(run(
        &ep,
        &ms,
        &["provision-aws", "--config", other.to_str().unwrap()],
    ));
    let out = ok(run(&ep, &ms, &["provision-aws", "--config", c]));
    assert!(
        out.contains("Nothing to do."),
        "fleet prod claims prod-2's alarms: {out}"
    );
    proxy.take();

    // Two boxes, `web` and `web-2`, watching a real app.
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    let web_app =
        format!("[[apps]]\nname = \"web\"\nhealth_url = \"http://127.0.0.1:{port}/health\"\n");
    let a = start_box(&pm2, &ep, &ms, "web", &web_app);
    let b = start_box(&pm2, &ep, &ms, "web-2", &web_app);
    wait_until(
        Duration::from_secs(30),
        "both boxes' streams and metrics",
        || {
            streams(&ms, "/pmguard/prod").is_some_and(|s| s == ["web", "web-2"])
                && sample_count(
                    &ms,
                    "ServiceStatus",
                    &[("App", "web"), ("Fleet", "prod"), ("InstanceId", "web-2")],
                ) > 0.0
                && sample_count(
                    &ms,
                    "ServiceStatus",
                    &[("App", "web"), ("Fleet", "prod"), ("InstanceId", "web")],
                ) > 0.0
                && sample_count(&ms, "AgentHeartbeat", &[("Fleet", "prod")]) >= 2.0
        },
    );
    let agents = proxy.take();
    for shared in [
        "CreateLogGroup",
        "PutRetentionPolicy",
        "CreateTopic",
        "PutMetricAlarm",
        "DeleteAlarms",
    ] {
        assert!(
            !agents.iter().any(|o| o == shared),
            "an instance called {shared}: {agents:?}"
        );
    }
    assert!(agents.iter().any(|o| o == "CreateLogStream"), "{agents:?}");
    drop(a);

    // uninstall --aws on box `web`: nothing shared goes, not even box web's stream.
    let root = tempfile::tempdir().unwrap();
    let web = fleet_config(
        dir.path(),
        "web.toml",
        "prod",
        apps,
        "instance_id = \"web\"\n",
    );
    let out = ok(run(
        &ep,
        &ms,
        &[
            "uninstall",
            "--root",
            root.path().to_str().unwrap(),
            "--aws",
            "--config",
            web.to_str().unwrap(),
        ],
    ));
    assert!(out.contains("owns no shared resource"), "{out}");
    let calls = proxy.take();
    assert!(
        mutating(&calls)
            .iter()
            .all(|o| o == "PutMetricData" || o == "PutLogEvents"),
        "{calls:?}"
    );
    assert_eq!(streams(&ms, "/pmguard/prod").unwrap(), ["web", "web-2"]);
    assert!(topics(&ms).contains(&"pmguard-prod-alerts".to_string()));
    assert_eq!(
        all_alarms(&ms)
            .iter()
            .filter(|a| a.starts_with("pmguard-fleet-prod-web"))
            .count(),
        3
    );
    drop(b);
    proxy.take(); // box web-2's last flush at its stop

    // --destroy lists and needs --yes.
    let o = run(&ep, &ms, &["provision-aws", "--config", c, "--destroy"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let shown = text(&o);
    assert!(
        shown.contains("delete alarm pmguard-fleet-prod-web-service-down"),
        "{shown}"
    );
    assert!(shown.contains("delete log group /pmguard/prod"), "{shown}");
    assert!(shown.contains("run again with --yes"), "{shown}");
    assert!(
        !shown.contains("prod-2") && !shown.contains("billing"),
        "{shown}"
    );
    let calls = proxy.take();
    assert!(mutating(&calls).is_empty(), "{calls:?}");

    ok(run(
        &ep,
        &ms,
        &["provision-aws", "--config", c, "--destroy", "--yes"],
    ));
    let left = all_alarms(&ms);
    assert!(
        left.contains(&"pmguard-fleet-prod-billing".to_string()),
        "{left:?}"
    );
    assert_eq!(
        left.iter()
            .filter(|a| a.starts_with("pmguard-fleet-prod-2-"))
            .count(),
        4,
        "{left:?}"
    );
    assert_eq!(left.len(), 5, "{left:?}");
    assert_eq!(topics(&ms), ["billing-alerts", "pmguard-prod-2-alerts"]);
    assert!(
        streams(&ms, "/pmguard/prod").is_none(),
        "the fleet's log group is gone"
    );
    assert!(streams(&ms, "/pmguard/prod-2").is_some());
}

#[test]
fn single_box_ownership_is_the_exact_instance_and_shared_resources_stay_while_used() {
    let ms = Ministack::start();
    let ep = ms.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let config = |file: &str, instance: &str, apps: &[&str]| {
        let mut t = String::new();
        for a in apps {
            t += &format!("[[apps]]\nname = \"{a}\"\n");
        }
        t += &format!("[aws]\nregion = \"us-east-1\"\nsns_topic = \"shared-alerts\"\ninstance_id = \"{instance}\"\n");
        let p = dir.path().join(file);
        std::fs::write(&p, t).unwrap();
        p.to_str().unwrap().to_string()
    };
    let web = config("web.toml", "web", &["api", "jobs"]);
    let web2 = config("web2.toml", "web-2", &["api", "jobs"]);
    ok(run(&ep, &ms, &["provision-aws", "--config", &web]));
    ok(run(&ep, &ms, &["provision-aws", "--config", &web2]));
    assert_eq!(all_alarms(&ms).len(), 14);

    // `web` drops an app: only web's alarms of that app go, web-2's stay.
    let web = config("web.toml", "web", &["api"]);
    let out = ok(run(&ep, &ms, &["provision-aws", "--config", &web]));
    assert_eq!(out.matches("delete alarm").count(), 3, "{out}");
    assert!(!out.contains("pmguard-web-2-"), "{out}");
    assert_eq!(all_alarms(&ms).len(), 11);

    // uninstall --aws on `web`: its alarms and dashboard; the topic stays (web-2's alarms use it).
    let root = tempfile::tempdir().unwrap();
    let out = ok(run(
        &ep,
        &ms,
        &[
            "uninstall",
            "--root",
            root.path().to_str().unwrap(),
            "--aws",
            "--config",
            &web,
        ],
    ));
    assert!(out.contains("keep SNS topic"), "{out}");
    let left = all_alarms(&ms);
    assert_eq!(left.len(), 7, "{left:?}");
    assert!(
        left.iter().all(|a| a.starts_with("pmguard-web-2-")),
        "{left:?}"
    );
    assert_eq!(topics(&ms), ["shared-alerts"]);
}

#[test]
fn the_config_round_trips_through_parameter_store() {
    let ms = Ministack::start();
    let proxy = CountingProxy::start(ms.port);
    let ep = proxy.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "ubuntu:x:1000:1000::/home/ubuntu:/bin/bash\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "ubuntu:x:1000:\n").unwrap();
    let apps = "[[apps]]\nname = \"web\"\nhealth_url = \"http://127.0.0.1:5000/health\"\n";
    let cfg = fleet_config(dir.path(), "prod.toml", "prod", apps, "");
    let c = cfg.to_str().unwrap();
    let param = "/pmguard/prod/config";
    // The agent is not run here: a small stand-in binary keeps the installs fast.
    let agent = dir.path().join("pmguard-agent");
    std::fs::write(&agent, "#!/bin/sh\n").unwrap();
    let install = |ep: &str| {
        run(
            ep,
            &ms,
            &[
                "install",
                "--config",
                &format!("ssm:{param}"),
                "--user",
                "ubuntu",
                "--root",
                root.to_str().unwrap(),
                "--agent-bin",
                agent.to_str().unwrap(),
            ],
        )
    };

    // Nothing stored yet: install says how to store it and installs nothing.
    let o = install(&ep);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("fleet push-config"), "{}", text(&o));

    // An invalid config is never stored.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[apps]]\nname = \"web\"\nmax_retries = 0\n").unwrap();
    let o = run(
        &ep,
        &ms,
        &[
            "fleet",
            "push-config",
            "--config",
            bad.to_str().unwrap(),
            "--parameter",
            param,
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("bad.toml:3"), "{}", text(&o));
    assert!(mutating(&proxy.take()).is_empty());

    // A fleet config that fixes instance_id would make every box one: never stored.
    let fixed = dir.path().join("fixed.toml");
    std::fs::write(
        &fixed,
        "[[apps]]\nname = \"web\"\n[aws]\nregion = \"us-east-1\"\nfleet = \"prod\"\ninstance_id = \"i-1\"\n",
    )
    .unwrap();
    let o = run(
        &ep,
        &ms,
        &[
            "fleet",
            "push-config",
            "--config",
            fixed.to_str().unwrap(),
            "--parameter",
            param,
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("every box of the fleet"), "{}", text(&o));
    assert!(mutating(&proxy.take()).is_empty());

    let out = ok(run(
        &ep,
        &ms,
        &["fleet", "push-config", "--config", c, "--parameter", param],
    ));
    assert!(
        out.contains("create SSM parameter /pmguard/prod/config"),
        "{out}"
    );
    assert_eq!(mutating(&proxy.take()), ["PutParameter"]);
    let out = ok(run(
        &ep,
        &ms,
        &["fleet", "push-config", "--config", c, "--parameter", param],
    ));
    assert!(out.contains("Nothing to do."), "{out}");
    assert!(mutating(&proxy.take()).is_empty());

    let out = ok(install(&ep));
    assert!(out.contains("create /etc/pmguard/pmguard.toml"), "{out}");
    let installed = std::fs::read_to_string(root.join("etc/pmguard/pmguard.toml")).unwrap();
    assert_eq!(installed, std::fs::read_to_string(&cfg).unwrap());
    assert!(ok(install(&ep)).contains("Nothing to do."));

    // A change rolled out through the parameter: the box converges on it.
    let cfg = fleet_config(
        dir.path(),
        "prod.toml",
        "prod",
        apps,
        "alarm_failures = 7\n",
    );
    let out = ok(run(
        &ep,
        &ms,
        &[
            "fleet",
            "push-config",
            "--config",
            cfg.to_str().unwrap(),
            "--parameter",
            param,
        ],
    ));
    assert!(out.contains("update SSM parameter"), "{out}");
    let out = ok(install(&ep));
    assert!(out.contains("update /etc/pmguard/pmguard.toml"), "{out}");
    assert!(out.contains("+alarm_failures = 7"), "{out}");
    assert!(ok(install(&ep)).contains("Nothing to do."));
}

#[test]
fn a_fleet_box_alerts_through_the_fleets_topic_without_creating_it() {
    let ms = Ministack::start();
    let proxy = CountingProxy::start(ms.port);
    let ep = proxy.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let cfg = fleet_config(
        dir.path(),
        "prod.toml",
        "prod",
        "[[apps]]\nname = \"loopapp\"\n",
        "",
    );
    ok(run(
        &ep,
        &ms,
        &["provision-aws", "--config", cfg.to_str().unwrap()],
    ));
    // An HTTP subscriber on 127.0.0.1 to the fleet's topic, confirmed.
    let rx = aws_common::Receiver::start();
    let sns = aws_sdk_sns::Client::new(&ms.sdk_config());
    let topic = rt()
        .block_on(sns.list_topics().send())
        .unwrap()
        .topics()
        .iter()
        .filter_map(|t| t.topic_arn())
        .find(|a| a.ends_with(":pmguard-prod-alerts"))
        .unwrap()
        .to_string();
    rt().block_on(
        sns.subscribe()
            .topic_arn(&topic)
            .protocol("http")
            .endpoint(format!("http://127.0.0.1:{}/sns", rx.port))
            .send(),
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the subscription confirmation",
        || {
            rx.bodies()
                .iter()
                .any(|b| b["Type"] == "SubscriptionConfirmation")
        },
    );
    let token = rx
        .bodies()
        .into_iter()
        .find(|b| b["Type"] == "SubscriptionConfirmation")
        .unwrap()["Token"]
        .as_str()
        .unwrap()
        .to_string();
    rt().block_on(
        sns.confirm_subscription()
            .topic_arn(&topic)
            .token(token)
            .send(),
    )
    .unwrap();
    proxy.take();

    // A crash-looping app on box web-2: the agent gives up and alerts the fleet's topic.
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app_env("loopapp", port, &[], &[("MODE", "500")]);
    let _box = start_box(
        &pm2,
        &ep,
        &ms,
        "web-2",
        &format!("[[apps]]\nname = \"loopapp\"\nhealth_url = \"http://127.0.0.1:{port}/health\"\ntimeout = \"500ms\"\nretry_interval = \"300ms\"\nstartup_grace = \"0s\"\nrestart_cooldown = \"1s\"\nmax_retries = 1\ncrashloop_restarts = 2\ncrashloop_window = \"1m\"\ncrashloop_backoff = \"1m\"\n"),
    );
    // (The stand-in may also notify the topic of the fleet heartbeat alarm's state.)
    let is_alert = |b: &serde_json::Value| {
        b["Type"] == "Notification" && b["Subject"].as_str().unwrap_or("").contains("loopapp")
    };
    wait_until(Duration::from_secs(40), "the SNS notification", || {
        rx.bodies().iter().any(is_alert)
    });
    let note = rx.bodies().into_iter().find(is_alert).unwrap();
    assert!(
        note["Message"].as_str().unwrap().contains("web-2"),
        "{note:#?}"
    );
    let calls = proxy.take();
    assert!(calls.iter().any(|o| o == "GetCallerIdentity"), "{calls:?}");
    assert!(calls.iter().any(|o| o == "Publish"), "{calls:?}");
    for shared in ["CreateTopic", "CreateLogGroup", "PutRetentionPolicy"] {
        assert!(
            !calls.iter().any(|o| o == shared),
            "the box called {shared}: {calls:?}"
        );
    }
}
