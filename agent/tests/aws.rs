//! The AWS sink end to end: the real agent binary, real PM2 apps, and ministack on 127.0.0.1 as
//! the AWS stand-in (read back with the real SDK). Flush interval 1 s.
//!
//! Fails closed: without `ministack` on PATH these tests fail (never skip), and every endpoint
//! they use is checked to be a loopback URL.

mod agent_harness;
mod aws_common;
mod common;

use std::collections::BTreeMap;

use std::time::{Duration, Instant};

use agent_harness::{app, Agent};
use aws_common::{rt, Ministack, Receiver, RefusingProxy};
use common::{free_port, set_mode, wait_until, Pm2Sandbox};
use serde_json::Value;

const NS: &str = "PM2/Test";
const GROUP: &str = "/pmguard/test";

fn aws_section(instance: &str, extra: &str) -> String {
    format!(
        "[aws]\nnamespace = \"{NS}\"\nlog_group = \"{GROUP}\"\nflush_interval = \"1s\"\ninstance_id = \"{instance}\"\n{extra}\n"
    )
}

fn stats(ms: &Ministack, metric: &str, dims: &[(&str, &str)]) -> Option<(f64, f64, f64, f64)> {
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
                .statistics(Statistic::Sum)
                .statistics(Statistic::Minimum)
                .statistics(Statistic::Maximum)
                .send(),
        )
        .unwrap_or_else(|e| panic!("GetMetricStatistics {metric}: {e:?}"));
    let points = out.datapoints();
    if points.is_empty() {
        return None;
    }
    let mut acc = (0.0, 0.0, f64::MAX, f64::MIN);
    for p in points {
        acc.0 += p.sample_count().unwrap_or(0.0);
        acc.1 += p.sum().unwrap_or(0.0);
        acc.2 = acc.2.min(p.minimum().unwrap_or(f64::MAX));
        acc.3 = acc.3.max(p.maximum().unwrap_or(f64::MIN));
    }
    Some(acc)
}

/// Every message in the instance's log stream (empty if the group or stream does not exist).
fn log_messages(ms: &Ministack, stream: &str) -> Vec<String> {
    let logs = aws_sdk_cloudwatchlogs::Client::new(&ms.sdk_config());
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let r = rt().block_on(
            logs.get_log_events()
                .log_group_name(GROUP)
                .log_stream_name(stream)
                .start_from_head(true)
                .set_next_token(token.clone())
                .send(),
        );
        let Ok(r) = r else { return out };
        let n = r.events().len();
        out.extend(
            r.events()
                .iter()
                .filter_map(|e| e.message().map(str::to_string)),
        );
        let next = r.next_forward_token().map(str::to_string);
        if n == 0 || next.is_none() || next == token {
            return out;
        }
        token = next;
    }
}

fn kinds(messages: &[String]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| serde_json::from_str::<Value>(m).ok())
        .map(|v| v["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The events of `events.jsonl` that go to CloudWatch Logs, at or after `since_ms`.
fn shipped_since(agent: &Agent, since_ms: u64) -> Vec<String> {
    let text = std::fs::read_to_string(agent.state().join("events.jsonl")).unwrap_or_default();
    text.lines()
        .filter(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or(Value::Null);
            v["kind"] != "probe"
                && v["kind"] != "check"
                && v["ts_ms"].as_u64().unwrap_or(0) >= since_ms
        })
        .map(str::to_string)
        .collect()
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Each of `expected` appears exactly once in `got`, and nothing in `got` appears twice.
fn assert_exactly_once(expected: &[String], got: &[String], what: &str) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for m in got {
        *counts.entry(m.as_str()).or_default() += 1;
    }
    let dup: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dup.is_empty(), "{what}: delivered more than once: {dup:#?}");
    let missing: Vec<_> = expected
        .iter()
        .filter(|e| !counts.contains_key(e.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: never delivered: {missing:#?}\ngot kinds {:?}",
        kinds(got)
    );
}

#[test]
fn metrics_events_and_alerts_reach_aws() {
    let ms = Ministack::start();
    // An HTTP subscriber on 127.0.0.1 for the alert topic.
    let rx = Receiver::start();
    let sns = aws_sdk_sns::Client::new(&ms.sdk_config());
    let topic = rt()
        .block_on(sns.create_topic().name("pmguard-test").send())
        .unwrap()
        .topic_arn()
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

    let pm2 = Pm2Sandbox::new();
    let (ok_port, bad_port) = (free_port(), free_port());
    pm2.start_app("okapp", ok_port, &[]);
    pm2.start_app_env("loopapp", bad_port, &[], &[("MODE", "500")]);
    let mut agent = Agent::new(
        &pm2,
        &aws_section("test-host", "sns_topic = \"pmguard-test\"\nlog_retention_days = 7"),
        &(app("okapp", ok_port, "")
            + &app(
                "loopapp",
                bad_port,
                "max_retries = 1\ncrashloop_restarts = 2\ncrashloop_window = \"1m\"\ncrashloop_backoff = \"1m\"",
            )),
    );
    agent.spawn_env(&ms.env());
    wait_until(Duration::from_secs(30), "a give_up event", || {
        !agent.of_kind("give_up").is_empty()
    });
    assert!(agent.threads().iter().any(|t| t == "aws-sink"));
    // The alert arrives through SNS, promptly (not only at the next flush).
    wait_until(Duration::from_secs(10), "the SNS notification", || {
        rx.bodies().iter().any(|b| b["Type"] == "Notification")
    });
    let notes: Vec<Value> = rx
        .bodies()
        .into_iter()
        .filter(|b| b["Type"] == "Notification")
        .collect();
    let subject = notes[0]["Subject"].as_str().unwrap_or("");
    assert!(
        subject.contains("loopapp") && subject.contains("crash loop"),
        "{notes:#?}"
    );
    assert!(notes[0]["Message"].as_str().unwrap().contains("test-host"));
    std::thread::sleep(Duration::from_millis(2500));
    let status = agent.stop_within(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", agent.log());

    // Metrics, read back with a real SDK client.
    let ok = [("App", "okapp"), ("InstanceId", "test-host")];
    let (count, sum, min, max) = stats(&ms, "ServiceStatus", &ok).expect("ServiceStatus");
    assert!(
        count >= 3.0 && sum == count && min == 1.0 && max == 1.0,
        "{count} {sum}"
    );
    let (count, sum, min, max) = stats(&ms, "ResponseTime", &ok).expect("ResponseTime");
    assert!(
        count >= 3.0 && min > 0.0 && min <= max && sum >= min * count,
        "{count} {sum} {min} {max}"
    );
    let (_, _, min, _) = stats(&ms, "MemoryBytes", &ok).expect("MemoryBytes");
    assert!(min > 1e6, "an app's RSS is more than 1 MB: {min}");
    assert!(stats(&ms, "CpuPercent", &ok).is_some());
    let (_, sum, _, _) = stats(&ms, "HealthCheckFailures", &ok).expect("HealthCheckFailures");
    assert_eq!(sum, 0.0);
    let bad = [("App", "loopapp"), ("InstanceId", "test-host")];
    let (_, failures, _, _) = stats(&ms, "HealthCheckFailures", &bad).unwrap();
    assert!(failures >= 2.0);
    let restarts = agent.of_kind("restart").len() as f64;
    let (_, sum, _, _) = stats(&ms, "ServiceRestarts", &bad).unwrap();
    assert_eq!(sum, restarts, "every restart counted once");
    let (count, _, _, _) =
        stats(&ms, "AgentHeartbeat", &[("InstanceId", "test-host")]).expect("heartbeat");
    assert!(count >= 3.0);
    // Events: the instance's stream in the log group, without the per-check probe results.
    let msgs = log_messages(&ms, "test-host");
    let k = kinds(&msgs);
    for want in [
        "agent_start",
        "restart",
        "restart_done",
        "give_up",
        "state_change",
        "agent_stop",
    ] {
        assert!(k.iter().any(|x| x == want), "no {want} in {k:?}");
    }
    assert!(!k.iter().any(|x| x == "probe" || x == "check"));
    assert_exactly_once(&shipped_since(&agent, 0), &msgs, "events");
    let agent_log = agent.log();
    assert!(
        agent_log.contains("Created the CloudWatch Logs group."),
        "{agent_log}"
    );
    assert!(!agent.state().join("spool/pending.json").exists());
}

/// ministack, a PM2 app "web" and an agent shipping to stream `host`, its `agent_start` delivered.
fn running_with_aws(host: &str, app_extra: &str) -> (Ministack, Pm2Sandbox, u16, Agent) {
    let ms = Ministack::start();
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    let mut agent = Agent::new(&pm2, &aws_section(host, ""), &app("web", port, app_extra));
    agent.spawn_env(&ms.env());
    wait_until(Duration::from_secs(20), "agent_start delivered", || {
        kinds(&log_messages(&ms, host))
            .iter()
            .any(|k| k == "agent_start")
    });
    (ms, pm2, port, agent)
}

#[test]
fn outage_keeps_watching_and_delivers_everything_once() {
    // `_pm2` keeps the PM2 daemon alive for the test.
    let (mut ms, _pm2, port, mut agent) = running_with_aws("fault-host", "max_retries = 2");
    // AWS goes away; the app hangs.
    let outage_ms = wall_ms();
    ms.pause();
    let hung = Instant::now();
    set_mode(port, "hang").unwrap();
    wait_until(Duration::from_secs(15), "the restart", || {
        !agent.of_kind("restart_done").is_empty()
    });
    let took = hung.elapsed();
    // 2 failed checks (500 ms timeout, 300 ms apart) + the restart: AWS being down costs nothing.
    assert!(
        took < Duration::from_secs(6),
        "restart took {took:?}\n{}",
        agent.log()
    );
    wait_until(Duration::from_secs(10), "a failed flush", || {
        agent
            .log()
            .contains("AWS unreachable or refusing; keeping data to send later.")
    });
    std::thread::sleep(Duration::from_secs(3));
    let spool = agent.state().join("spool/pending.json");
    {
        use std::os::unix::fs::MetadataExt;
        let mode = std::fs::metadata(&spool)
            .expect("spilled while AWS is down")
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // AWS comes back (empty): what was buffered arrives.
    let back_ms = wall_ms();
    ms.resume();
    wait_until(Duration::from_secs(20), "buffered events delivered", || {
        kinds(&log_messages(&ms, "fault-host"))
            .iter()
            .any(|k| k == "restart_done")
    });
    assert!(agent
        .log()
        .contains("AWS reachable again; sending buffered data."));
    let stop_ms = wall_ms();
    assert!(agent.stop_within(Duration::from_secs(10)).success());
    let msgs = log_messages(&ms, "fault-host");
    assert_exactly_once(
        &shipped_since(&agent, outage_ms),
        &msgs,
        "events after the outage",
    );
    let restarts = agent
        .of_kind("restart")
        .iter()
        .filter(|e| e["ts_ms"].as_u64().unwrap() >= outage_ms)
        .count() as f64;
    assert!(restarts >= 1.0);
    let (_, sum, _, _) = stats(
        &ms,
        "ServiceRestarts",
        &[("App", "web"), ("InstanceId", "fault-host")],
    )
    .expect("restart metrics from the outage");
    assert_eq!(
        sum,
        restarts,
        "each restart counted exactly once: {:#?}",
        agent
            .events()
            .iter()
            .filter(|e| e["kind"] != "probe")
            .map(|e| format!("{} {} {}", e["ts_ms"], e["kind"], e["message"]))
            .collect::<Vec<_>>()
    );
    // One heartbeat per flush from the outage to the stop: none lost, none twice.
    let (beats, _, _, _) = stats(&ms, "AgentHeartbeat", &[("InstanceId", "fault-host")]).unwrap();
    let outage_flushes = (back_ms - outage_ms) as f64 / 1000.0;
    let all_flushes = (stop_ms - outage_ms) as f64 / 1000.0;
    assert!(
        beats >= outage_flushes - 1.0 && beats <= all_flushes + 2.0,
        "{beats} heartbeats for {outage_flushes:.1} s of outage and {all_flushes:.1} s in all"
    );
    assert!(!spool.exists(), "spool removed once delivered");
}

/// Fault: the AWS endpoint accepts connections and never answers (blackholed, SIGSTOPped).
/// The watch loop never waits on AWS: a hang is restarted on time, and once the endpoint
/// answers again every event arrives exactly once.
#[test]
fn a_blackholed_endpoint_never_delays_a_restart_and_loses_nothing() {
    let (ms, _pm2, port, mut agent) = running_with_aws("blackhole-host", "max_retries = 2");
    let outage_ms = wall_ms();
    ms.stall();
    let hung = Instant::now();
    set_mode(port, "hang").unwrap();
    wait_until(Duration::from_secs(15), "the restart", || {
        !agent.of_kind("restart_done").is_empty()
    });
    let took = hung.elapsed();
    eprintln!("AWS blackholed: hang to restart done in {took:?}");
    assert!(
        took < Duration::from_secs(6),
        "restart took {took:?}\n{}",
        agent.log()
    );
    std::thread::sleep(Duration::from_secs(3));
    ms.unstall();
    wait_until(Duration::from_secs(40), "buffered events delivered", || {
        kinds(&log_messages(&ms, "blackhole-host"))
            .iter()
            .any(|k| k == "restart_done")
    });
    assert!(agent.stop_within(Duration::from_secs(10)).success());
    // At least once: requests the frozen endpoint had accepted were stored when it thawed,
    // after the agent had given up on them and kept the data to send again. No AWS call here is
    // idempotent, so a blackhole may duplicate (events carry ts_ms to tell); it never loses.
    let got = log_messages(&ms, "blackhole-host");
    let missing: Vec<String> = shipped_since(&agent, outage_ms)
        .into_iter()
        .filter(|e| !got.contains(e))
        .collect();
    assert!(
        missing.is_empty(),
        "events lost across the blackhole: {missing:#?}"
    );
}

/// Fault: the agent is SIGKILLed while AWS is down (no chance to spill at stop). What the
/// failed flushes already spilled to the spool survives and is delivered by the next agent.
#[test]
fn an_agent_sigkilled_during_an_outage_keeps_its_spool() {
    let (mut ms, _pm2, port, mut agent) = running_with_aws("kill-host", "max_retries = 2");
    ms.pause();
    set_mode(port, "500").unwrap();
    agent.wait_for(Duration::from_secs(15), "restart");
    let spool = agent.state().join("spool/pending.json");
    wait_until(
        Duration::from_secs(15),
        "a spill after a failed flush",
        || std::fs::read_to_string(&spool).is_ok_and(|s| s.contains("Restarting: ")),
    );
    let spooled = std::fs::read_to_string(&spool).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .ok();
    let _ = agent.child.as_mut().map(|c| c.wait());
    let _ = set_mode(port, "ok");
    agent.spawn_env(&ms.env());
    wait_until(Duration::from_secs(10), "second agent_start", || {
        agent.of_kind("agent_start").len() == 2
    });
    ms.resume();
    wait_until(Duration::from_secs(30), "the spool delivered", || {
        kinds(&log_messages(&ms, "kill-host"))
            .iter()
            .any(|k| k == "restart")
            && !spool.exists()
    });
    assert!(agent.stop_within(Duration::from_secs(10)).success());
    let got = log_messages(&ms, "kill-host");
    let restart = agent.of_kind("restart")[0]["ts_ms"].as_u64().unwrap();
    assert!(
        got.iter()
            .any(|m| m.contains(&format!("\"ts_ms\":{restart}"))),
        "the spooled restart event was lost: {:?}\nspool had: {spooled}",
        kinds(&got)
    );
}

#[test]
fn agent_restart_while_aws_is_down_loses_nothing() {
    let (mut ms, _pm2, _port, mut agent) = running_with_aws("restart-host", "");
    let outage_ms = wall_ms();
    ms.pause();
    agent.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(5), "the reload", || {
        !agent.of_kind("reload").is_empty()
    });
    std::thread::sleep(Duration::from_secs(2));
    let stopped = Instant::now();
    assert!(agent.stop_within(Duration::from_secs(10)).success());
    assert!(
        stopped.elapsed() < Duration::from_secs(8),
        "stop took {:?}",
        stopped.elapsed()
    );
    let spool = agent.state().join("spool/pending.json");
    let spooled = std::fs::read_to_string(&spool).expect("the buffer was spilled at stop");
    assert!(spooled.contains("agent_stop") && spooled.contains("reload"));
    // Second run, AWS still down.
    agent.spawn_env(&ms.env());
    wait_until(Duration::from_secs(10), "second agent_start", || {
        agent.of_kind("agent_start").len() == 2
    });
    std::thread::sleep(Duration::from_secs(2));
    ms.resume();
    wait_until(Duration::from_secs(20), "everything delivered", || {
        kinds(&log_messages(&ms, "restart-host"))
            .iter()
            .filter(|k| *k == "agent_start")
            .count()
            == 1
            && !agent.state().join("spool/pending.json").exists()
    });
    assert!(agent.stop_within(Duration::from_secs(10)).success());
    let msgs = log_messages(&ms, "restart-host");
    assert_exactly_once(
        &shipped_since(&agent, outage_ms),
        &msgs,
        "events across the restart",
    );
    let k = kinds(&msgs);
    // In order: the first run's reload and stop come before the second run's start.
    let pos = |kind: &str| k.iter().position(|x| x == kind).unwrap();
    assert!(
        pos("reload") < pos("agent_stop") && pos("agent_stop") < pos("agent_start"),
        "{k:?}"
    );
    assert!(agent
        .log()
        .contains("Loaded undelivered AWS data from the spool"));
    // The first run's heartbeats during the outage made it too.
    let (beats, _, _, _) = stats(&ms, "AgentHeartbeat", &[("InstanceId", "restart-host")]).unwrap();
    assert!(beats >= 3.0, "{beats}");
}

#[test]
fn without_aws_section_no_sink_runs() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    let mut agent = Agent::new(&pm2, "", &app("web", port, ""));
    agent.spawn_env(&[]);
    wait_until(Duration::from_secs(10), "a probe", || {
        !agent.of_kind("probe").is_empty()
    });
    let threads = agent.threads();
    assert!(
        !threads
            .iter()
            .any(|t| t.contains("aws") || t.contains("tokio")),
        "{threads:?}"
    );
    assert!(agent.stop_within(Duration::from_secs(5)).success());
    assert!(!agent.state().join("spool").exists());
    assert!(!agent.log().contains("AWS"));
}

#[test]
fn refuses_a_non_loopback_endpoint() {
    aws_common::assert_loopback("http://127.0.0.1:4566");
    aws_common::assert_loopback("http://[::1]:4566/");
    aws_common::assert_loopback("http://localhost:1");
    for bad in [
        "https://monitoring.us-east-1.amazonaws.com",
        "http://10.0.0.1:4566",
        "ftp://127.0.0.1",
    ] {
        assert!(
            std::panic::catch_unwind(|| aws_common::assert_loopback(bad)).is_err(),
            "{bad}"
        );
    }
}

/// IMDSv2 by hand (PUT a token, GET with it): the instance id ministack's simulated EC2 gives.
fn imds_instance_id(ms: &Ministack) -> String {
    use std::io::{Read, Write};
    let exchange = |req: String| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", ms.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_once("\r\n\r\n").unwrap().1.trim().to_string()
    };
    let token = exchange("PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into());
    exchange(format!("GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token: {token}\r\nConnection: close\r\n\r\n"))
}

/// A PM2 app "web" and an agent on it with `[aws]` (no instance id unless given), run with
/// exactly `env`.
fn agent_with_env(aws: &str, env: &[(&str, String)]) -> (Pm2Sandbox, Agent) {
    for (k, v) in env {
        if k.starts_with("AWS_ENDPOINT_URL") || *k == "AWS_EC2_METADATA_SERVICE_ENDPOINT" {
            aws_common::assert_loopback(v);
        }
    }
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    let mut agent = Agent::new(&pm2, aws, &app("web", port, ""));
    agent.spawn_env(env);
    (pm2, agent)
}

fn no_files(dir: &std::path::Path) -> Vec<(&'static str, String)> {
    let empty = dir.join("empty");
    std::fs::write(&empty, "").unwrap();
    vec![
        ("AWS_CONFIG_FILE", empty.display().to_string()),
        ("AWS_SHARED_CREDENTIALS_FILE", empty.display().to_string()),
    ]
}

#[test]
fn on_a_simulated_ec2_the_agent_needs_no_keys_region_or_instance_id() {
    // ministack's IMDS, token required (IMDSv2 only, as on a hardened instance).
    let ms = Ministack::start_with(&[("MINISTACK_IMDS_V2_REQUIRED", "1")]);
    let dir = tempfile::tempdir().unwrap();
    let mut env = no_files(dir.path());
    env.push(("AWS_ENDPOINT_URL", ms.endpoint()));
    env.push(("AWS_EC2_METADATA_SERVICE_ENDPOINT", ms.endpoint()));
    let aws =
        format!("[aws]\nnamespace = \"{NS}\"\nlog_group = \"{GROUP}\"\nflush_interval = \"1s\"\n");
    let (_pm2, mut agent) = agent_with_env(&aws, &env);
    let instance = imds_instance_id(&ms);
    assert!(instance.starts_with("i-"), "{instance}");
    wait_until(
        Duration::from_secs(20),
        "a metric under the IMDS instance id",
        || {
            stats(
                &ms,
                "ServiceStatus",
                &[("App", "web"), ("InstanceId", &instance)],
            )
            .is_some()
        },
    );
    wait_until(
        Duration::from_secs(10),
        "agent_start in the IMDS instance's stream",
        || {
            kinds(&log_messages(&ms, &instance))
                .iter()
                .any(|k| k == "agent_start")
        },
    );
    let log = agent.log();
    assert!(log.contains("region=\"us-east-1\""), "{log}");
    assert!(!log.contains("No usable AWS credentials"), "{log}");
    assert!(agent.stop_within(Duration::from_secs(10)).success());
}

#[test]
fn ministack_verifies_signatures_and_a_profile_with_static_keys_signs_right() {
    // With AUTH=true ministack checks the SigV4 signature of an IAM user's key.
    let ms = Ministack::start_with(&[("AUTH", "true")]);
    let (key, secret) = ms.iam_user_keys("box");
    let dir = tempfile::tempdir().unwrap();
    let (cfg, creds) = (dir.path().join("config"), dir.path().join("credentials"));
    std::fs::write(
        &cfg,
        format!("[profile box]\nregion = {}\n", aws_common::REGION),
    )
    .unwrap();
    std::fs::write(
        &creds,
        format!("[box]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"),
    )
    .unwrap();
    let env = vec![
        ("AWS_ENDPOINT_URL", ms.endpoint()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_PROFILE", "box".into()),
        ("AWS_CONFIG_FILE", cfg.display().to_string()),
        ("AWS_SHARED_CREDENTIALS_FILE", creds.display().to_string()),
    ];
    let (_pm2, mut good) = agent_with_env(&aws_section("signed-host", ""), &env);
    wait_until(
        Duration::from_secs(20),
        "the profile's signed metric",
        || {
            stats(
                &ms,
                "ServiceStatus",
                &[("App", "web"), ("InstanceId", "signed-host")],
            )
            .is_some()
        },
    );
    wait_until(
        Duration::from_secs(10),
        "the profile's signed events",
        || {
            kinds(&log_messages(&ms, "signed-host"))
                .iter()
                .any(|k| k == "agent_start")
        },
    );
    assert!(good.stop_within(Duration::from_secs(10)).success());

    // The same request signed with a wrong secret is refused, and nothing is delivered.
    let bad_env = vec![
        ("AWS_ENDPOINT_URL", ms.endpoint()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_ACCESS_KEY_ID", key.clone()),
        ("AWS_SECRET_ACCESS_KEY", format!("{secret}x")),
        ("AWS_REGION", aws_common::REGION.into()),
    ];
    let (_pm2b, mut bad) = agent_with_env(
        &aws_section("badsig-host", ""),
        &[no_files(dir.path()), bad_env].concat(),
    );
    let until = Instant::now() + Duration::from_secs(20);
    while !bad.log().contains("AWS unreachable or refusing") {
        assert!(Instant::now() < until, "no refusal logged:\n{}", bad.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = bad.log();
    assert!(log.contains("SignatureDoesNotMatch"), "{log}");
    assert!(stats(
        &ms,
        "ServiceStatus",
        &[("App", "web"), ("InstanceId", "badsig-host")]
    )
    .is_none());
    assert!(bad.stop_within(Duration::from_secs(15)).success());
    // Kept for the next start, not dropped: a signature error is not the data's fault.
    assert!(bad.state().join("spool/pending.json").exists());
}

#[test]
fn an_assume_role_profile_is_refused_once_and_never_falls_back_to_the_instance_role() {
    let ms = Ministack::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config");
    std::fs::write(&cfg, "[profile ops]\nrole_arn = arn:aws:iam::000000000000:role/ops\nsource_profile = default\nregion = us-east-1\n").unwrap();
    let env = vec![
        ("AWS_ENDPOINT_URL", ms.endpoint()),
        // IMDS is there with role credentials: the agent must still not use them.
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", ms.endpoint()),
        ("AWS_PROFILE", "ops".into()),
        ("AWS_CONFIG_FILE", cfg.display().to_string()),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.path().join("none").display().to_string(),
        ),
    ];
    let (_pm2, mut agent) = agent_with_env(&aws_section("role-host", ""), &env);
    wait_until(Duration::from_secs(20), "the credentials error", || {
        agent.log().contains("No usable AWS credentials")
    });
    // A few flushes later: still one error, nothing delivered.
    wait_until(Duration::from_secs(10), "three heartbeats", || {
        agent.of_kind("probe").len() >= 3
    });
    let log = agent.log();
    assert_eq!(log.matches("No usable AWS credentials").count(), 1, "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("No usable AWS credentials"))
        .unwrap();
    assert!(
        line.contains("\\\"ops\\\"") || line.contains("\"ops\""),
        "{line}"
    );
    assert!(
        line.contains("role_arn")
            && line.contains("instance profile")
            && line.contains("static keys"),
        "{line}"
    );
    assert!(stats(
        &ms,
        "ServiceStatus",
        &[("App", "web"), ("InstanceId", "role-host")]
    )
    .is_none());
    assert!(log_messages(&ms, "role-host").is_empty());
    assert!(agent.stop_within(Duration::from_secs(15)).success());
}

#[test]
fn in_a_container_the_agent_takes_the_task_role_from_a_loopback_full_uri() {
    // ministack serves ECS task-role documents at /v2/credentials/<id> on its gateway port.
    let ms = Ministack::start();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "container-token\n").unwrap();
    let full_uri = format!("{}/v2/credentials/task-1", ms.endpoint());
    aws_common::assert_loopback(&full_uri);
    let mut env = no_files(dir.path());
    env.extend([
        ("AWS_ENDPOINT_URL", ms.endpoint()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_REGION", aws_common::REGION.into()),
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", full_uri),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            token_file.display().to_string(),
        ),
    ]);
    let (_pm2, mut agent) = agent_with_env(&aws_section("task-host", ""), &env);
    wait_until(
        Duration::from_secs(20),
        "a metric signed with the task role",
        || {
            stats(
                &ms,
                "ServiceStatus",
                &[("App", "web"), ("InstanceId", "task-host")],
            )
            .is_some()
        },
    );
    let log = agent.log();
    assert!(!log.contains("No usable AWS credentials"), "{log}");
    assert!(!log.contains("container-token"), "{log}");
    assert!(agent.stop_within(Duration::from_secs(10)).success());
}

/// SIGTERM while a flush hangs in a call to a frozen endpoint (ministack SIGSTOPped): what was
/// taken before the stop (`agent_start`) and `agent_stop` itself are spooled, and the sink ends
/// within its stop deadline instead of being left behind.
#[test]
fn sigterm_during_a_hung_call_spools_the_flush_and_agent_stop() {
    let ms = Ministack::start();
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    // flush 12 s -> a call may take 9 s; an attempt 6 s.
    let aws = "[aws]\nnamespace = \"PM2/Test\"\nlog_group = \"/pmguard/test\"\nflush_interval = \"12s\"\ninstance_id = \"sigterm-host\"\n";
    let mut agent = Agent::new(&pm2, aws, &app("web", port, ""));
    ms.stall();
    agent.spawn_env(&ms.env());
    agent.wait_for(Duration::from_secs(10), "agent_start");
    // Past the first flush: the sink is inside PutMetricData against the frozen endpoint.
    std::thread::sleep(Duration::from_secs(14));
    assert!(agent.stop_within(Duration::from_secs(30)).success());
    ms.unstall();
    let log = agent.log();
    assert!(
        !log.contains("did not stop in time"),
        "the sink outlived its stop deadline:\n{log}"
    );
    let spooled =
        std::fs::read_to_string(agent.state().join("spool/pending.json")).unwrap_or_default();
    assert!(
        spooled.contains("agent_start") && spooled.contains("agent_stop"),
        "events neither delivered nor spooled; spool: {spooled}\nlog:\n{log}"
    );
}

/// An error reply whose message has a 2-byte char across byte 300 once panicked the sink
/// thread, which then never sent again. A fake endpoint: ministack's error messages cannot be
/// chosen. The sink keeps retrying (AccessDenied keeps the data) and the agent never panics.
#[test]
fn an_error_message_with_unicode_at_the_cut_does_not_stop_the_sink() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ep = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            h.fetch_add(1, Ordering::SeqCst);
            s.set_read_timeout(Some(Duration::from_millis(200))).ok();
            let _ = s.read(&mut [0u8; 65536]);
            let body = format!(
                r#"{{"__type":"AccessDeniedException","message":"{}é"}}"#,
                "a".repeat(299)
            );
            let _ = write!(
                s,
                "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    let aws = "[aws]\nregion = \"us-east-1\"\nnamespace = \"PM2/Test\"\nlog_group = \"/pmguard/test\"\nflush_interval = \"1s\"\ninstance_id = \"panic-host\"\n";
    let mut agent = Agent::new(&pm2, aws, &app("web", port, ""));
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    agent.spawn_env(&[
        ("AWS_ENDPOINT_URL", ep),
        ("AWS_ACCESS_KEY_ID", "AKIDTEST".into()),
        ("AWS_SECRET_ACCESS_KEY", "secret".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_CONFIG_FILE", empty.display().to_string()),
        ("AWS_SHARED_CREDENTIALS_FILE", empty.display().to_string()),
    ]);
    agent.wait_for(Duration::from_secs(10), "agent_start");
    wait_until(Duration::from_secs(10), "a first refused request", || {
        hits.load(Ordering::SeqCst) > 0
    });
    let first = hits.load(Ordering::SeqCst);
    wait_until(Duration::from_secs(10), "the sink sending again", || {
        hits.load(Ordering::SeqCst) > first + 2
    });
    assert!(agent.stop_within(Duration::from_secs(15)).success());
    let log = agent.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("AccessDeniedException"), "{log}");
}

/// An earlier run left 1000 datums in the spool that AWS refuses as a whole request (something
/// no local check catches; ministack accepts everything, so a proxy in front of it refuses them
/// as AWS would). Each flush makes a bounded number of PutMetricData calls (the halving once made
/// about 11,000 in one flush), the app's metrics still arrive from the first flush, the datums
/// proven bad are dropped and counted, and the unjudged rest is kept.
#[test]
fn datums_aws_refuses_cost_a_bounded_number_of_calls_per_flush_and_valid_metrics_arrive() {
    let ms = Ministack::start();
    let proxy = RefusingProxy::start(ms.port, "refused-by-aws");
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    let host = "refusal-host";
    let mut agent = Agent::new(&pm2, &aws_section(host, ""), &app("web", port, ""));
    let now = wall_ms();
    let refused: Vec<Value> = (0..1000u64)
        .map(|i| {
            serde_json::json!({
                "name": "ServiceStatus",
                "dims": [["App", "refused-by-aws"], ["InstanceId", host]],
                "ts_ms": now - 60_000 - i,
                "stats": {"count": 1.0, "sum": 1.0, "min": 1.0, "max": 1.0},
                "unit": "None"
            })
        })
        .collect();
    let spool = agent.state().join("spool/pending.json");
    {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(spool.parent().unwrap())
            .unwrap();
        let doc = serde_json::json!({"metrics": refused, "logs": [], "alerts": [], "dropped": 0});
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&spool)
            .unwrap();
        std::io::Write::write_all(&mut f, doc.to_string().as_bytes()).unwrap();
    }
    let mut env = ms.env();
    env.push(("AWS_ENDPOINT_URL_CLOUDWATCH", proxy.endpoint()));
    agent.spawn_env(&env);
    let web = [("App", "web"), ("InstanceId", host)];
    wait_until(
        Duration::from_secs(15),
        "the app's metrics past the refused datums",
        || stats(&ms, "ServiceStatus", &web).is_some(),
    );
    std::thread::sleep(Duration::from_secs(3));
    let stopping = Instant::now();
    assert!(agent.stop_within(Duration::from_secs(15)).success());
    let bursts = proxy.bursts(Duration::from_millis(300), stopping);
    eprintln!("PutMetricData calls per flush: {bursts:?}");
    let bound = 2 + pmguard_agent::aws::bisect::budget_for(1000) as usize;
    assert!(bursts.len() >= 3, "{bursts:?}");
    assert!(
        bursts.iter().all(|n| *n <= bound),
        "more than {bound} calls in a flush: {bursts:?}"
    );
    let (beats, _, _, _) = stats(&ms, "AgentHeartbeat", &[("InstanceId", host)]).unwrap();
    assert!(beats >= 3.0, "{beats}");
    let log = agent.log();
    assert!(
        log.contains("CloudWatch refused a metric; dropping it."),
        "{log}"
    );
    // Every refused datum is accounted for: reported dropped, counted for the next report, or
    // still spooled unjudged.
    let (_, reported, _, _) = stats(&ms, "DroppedDatapoints", &[("InstanceId", host)])
        .expect("the datums proven bad are reported");
    let left: Value = serde_json::from_str(&std::fs::read_to_string(&spool).unwrap()).unwrap();
    let kept = left["metrics"].as_array().unwrap().len() as f64;
    let counted = left["dropped"].as_f64().unwrap();
    assert!(kept > 0.0 && reported >= 1.0, "{kept} {reported}");
    assert_eq!(
        reported + counted + kept,
        1000.0,
        "{reported} + {counted} + {kept}"
    );
}

/// A non-ASCII `instance_id` is a warning, not a config error, and costs no metric: the agent
/// sends it percent-encoded as the InstanceId dimension and the log stream name.
#[test]
fn a_non_ascii_instance_id_is_a_warning_and_every_metric_is_sent_under_its_encoding() {
    let ms = Ministack::start();
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    let mut agent = Agent::new(&pm2, &aws_section("höst", ""), &app("web", port, ""));
    let out = std::process::Command::new(agent_harness::AGENT)
        .args(["validate", "--config"])
        .arg(agent.config())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("WARNING: instance_id `höst`") && stdout.contains("`h%C3%B6st`"),
        "{stdout}"
    );
    agent.spawn_env(&ms.env());
    let sent = "h%C3%B6st";
    wait_until(
        Duration::from_secs(20),
        "metrics under the encoded instance id",
        || {
            stats(
                &ms,
                "ServiceStatus",
                &[("App", "web"), ("InstanceId", sent)],
            )
            .is_some()
                && stats(&ms, "AgentHeartbeat", &[("InstanceId", sent)]).is_some()
        },
    );
    wait_until(
        Duration::from_secs(10),
        "agent_start in the encoded stream",
        || {
            kinds(&log_messages(&ms, sent))
                .iter()
                .any(|k| k == "agent_start")
        },
    );
    assert!(agent.stop_within(Duration::from_secs(10)).success());
    let log = agent.log();
    assert!(log.contains("sending it percent-encoded"), "{log}");
    assert!(
        !log.contains("Dropping a metric AWS would refuse."),
        "{log}"
    );
}
