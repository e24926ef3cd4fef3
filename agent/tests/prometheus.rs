//! `[agent] prometheus_textfile` and `status --format prometheus`, checked by the real
//! `promtool check metrics` (Debian package `prometheus`, installed by .ci/run; a missing
//! promtool fails the test with the package to install).

mod agent_harness;
mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use agent_harness::{app, Agent, AGENT};
use common::{free_port, set_mode, wait_until, Pm2Sandbox};

/// `promtool check metrics` on `text`: its complaints, or a failed test if it is missing.
fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("`promtool` is missing ({e}): install the Debian package prometheus (bash .ci/run does)"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && said.trim().is_empty(), said)
}

fn sample(text: &str, line_start: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .map(|l| l[line_start.len()..].trim().to_string())
}

#[test]
fn the_textfile_passes_promtool_and_follows_the_apps() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    pm2.start_app("we\"ird", free_port(), &[]);
    let dir = tempfile::tempdir().unwrap();
    let prom = dir.path().join("pmguard.prom");
    let missing = dir.path().join("nosuch/pmguard.prom");
    let agent = Agent::start_with(
        &pm2,
        &format!("prometheus_textfile = \"{}\"", prom.display()),
        &(app("web", port, "max_retries = 2") + "[[apps]]\nname = 'we\"ird'\n"),
        &[],
    );
    wait_until(Duration::from_secs(15), "the textfile", || prom.exists());
    let text = std::fs::read_to_string(&prom).unwrap();
    let (ok, said) = promtool(&text);
    assert!(ok, "promtool check metrics:\n{said}\n{text}");
    assert_eq!(std::fs::metadata(&prom).unwrap().mode() & 0o777, 0o644);
    assert!(text.contains("pmguard_up{app=\"we\\\"ird\"} "), "{text}");
    wait_until(Duration::from_secs(10), "web up in the textfile", || {
        let t = std::fs::read_to_string(&prom).unwrap();
        sample(&t, "pmguard_up{app=\"web\"}").as_deref() == Some("1")
            && sample(&t, "pmguard_memory_bytes{app=\"web\"}").is_some_and(|m| m != "0")
    });
    // A pause shows at once; the hung app goes down in the file, and is not restarted.
    let out = Command::new(AGENT)
        .args(["pause", "web", "--for", "5m", "--config"])
        .arg(agent.config())
        .output()
        .unwrap();
    assert!(out.status.success());
    set_mode(port, "hang").unwrap();
    wait_until(
        Duration::from_secs(15),
        "web paused and down in the textfile",
        || {
            let t = std::fs::read_to_string(&prom).unwrap();
            sample(&t, "pmguard_paused{app=\"web\"}").as_deref() == Some("1")
                && sample(&t, "pmguard_up{app=\"web\"}").as_deref() == Some("0")
                && sample(&t, "pmguard_consecutive_failures{app=\"web\"}").as_deref() == Some("2")
        },
    );
    // `status --format prometheus` prints the same families, and promtool takes it too.
    let out = Command::new(AGENT)
        .args(["status", "--format", "prometheus", "--config"])
        .arg(agent.config())
        .output()
        .unwrap();
    let printed = String::from_utf8(out.stdout).unwrap();
    let (ok, said) = promtool(&printed);
    assert!(ok, "promtool check metrics:\n{said}\n{printed}");
    let families = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with("# TYPE"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        families(&printed),
        families(&std::fs::read_to_string(&prom).unwrap())
    );
    assert!(agent.of_kind("restart").is_empty());
    assert!(!missing.exists());
}

#[test]
fn a_textfile_directory_that_does_not_exist_is_not_created_and_watching_goes_on() {
    let pm2 = Pm2Sandbox::new();
    let port = free_port();
    pm2.start_app("web", port, &[]);
    let dir = tempfile::tempdir().unwrap();
    let prom = dir.path().join("nosuch/pmguard.prom");
    let agent = Agent::start_with(
        &pm2,
        &format!("prometheus_textfile = \"{}\"", prom.display()),
        &app("web", port, ""),
        &[],
    );
    agent.wait_for_probe_ok();
    wait_until(Duration::from_secs(10), "a heartbeat", || {
        agent.state().join("status.json").exists()
    });
    assert!(!prom.parent().unwrap().exists());
    assert!(
        agent
            .log()
            .contains("Cannot write the Prometheus textfile."),
        "{}",
        agent.log()
    );
}
