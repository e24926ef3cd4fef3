//! The apps' state in Prometheus' text exposition format, for node_exporter's textfile
//! collector (`[agent] prometheus_textfile`) and `pmguard-agent status --format prometheus`.
//!
//! Pure: `encode` turns what `status.json` holds into text; `Textfile` writes it. Names follow
//! Prometheus' conventions: the `pmguard_` prefix, base units (seconds, bytes, ratios), `_total`
//! for counters, one `app` label; every family has its HELP and TYPE lines, and label values are
//! escaped. No port is ever opened: node_exporter reads the file.

use std::borrow::Borrow;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::clock::{self, Mono};
use crate::policy::Health;
use crate::report::state::{AppStatus, SinkStatus, StatusFile};
use crate::sys::files;

/// One metric family: name, type, help, and a sample per app (`None`: no sample).
struct Family<'a> {
    name: &'a str,
    kind: &'a str,
    help: &'a str,
    value: fn(&AppStatus) -> Option<f64>,
}

fn sum(v: impl Iterator<Item = f64>) -> Option<f64> {
    v.fold(None, |acc, x| Some(acc.unwrap_or(0.0) + x))
}

/// The families per app, in output order.
fn families() -> [Family<'static>; 10] {
    let f = |name, kind, help, value| Family {
        name,
        kind,
        help,
        value,
    };
    [
        f("pmguard_up", "gauge", "Whether the app's last check passed (1) or not (0).", |a| Some(f64::from(u8::from(a.health == Health::Healthy)))),
        f("pmguard_consecutive_failures", "gauge", "Consecutive failed checks counted toward a restart (max_retries restarts).", |a| Some(f64::from(a.failures))),
        f("pmguard_checks_total", "counter", "Checks made since the agent started.", |a| Some(a.checks as f64)),
        f("pmguard_restarts_total", "counter", "Restarts of the app's processes as PM2 counts them (pmguard's own and PM2's autorestarts), summed over instances.", |a| Some(a.instances.iter().map(|i| i.restart_time as f64).sum())),
        f("pmguard_response_time_seconds", "gauge", "Duration of the last health probe, connect to last byte.", |a| a.probes.back().map(|p| p.latency_ms as f64 / 1000.0)),
        f("pmguard_cpu_ratio", "gauge", "CPU used by the app's processes, in cores (1 = one core fully busy), summed over instances.", |a| sum(a.instances.iter().filter_map(|i| i.cpu_pct).map(|c| c / 100.0))),
        f("pmguard_memory_bytes", "gauge", "Resident memory of the app's processes as PM2 reports it, summed over instances.", |a| sum(a.instances.iter().map(|i| i.memory as f64))),
        f("pmguard_instances", "gauge", "The app's PM2 instances.", |a| Some(a.instances.len() as f64)),
        f("pmguard_paused", "gauge", "Whether a maintenance pause is in force (1): checked, never restarted.", |a| Some(f64::from(u8::from(a.paused.is_some())))),
        f("pmguard_paused_until_timestamp_seconds", "gauge", "When the maintenance pause ends by itself, in Unix seconds.", |a| a.paused.as_ref().map(|p| p.until_ms as f64 / 1000.0)),
    ]
}

/// The text for `status` (borrowed from the live board or read from `status.json`).
pub fn encode<A: Borrow<AppStatus>>(status: &StatusFile<A>) -> String {
    let mut out = String::new();
    let heartbeat_ms = status.boot_epoch + status.heartbeat;
    family_header(
        &mut out,
        "pmguard_heartbeat_timestamp_seconds",
        "gauge",
        "When the agent last proved it was watching on schedule, in Unix seconds.",
    );
    let _ = writeln!(
        out,
        "pmguard_heartbeat_timestamp_seconds {}",
        number(heartbeat_ms as f64 / 1000.0)
    );
    family_header(
        &mut out,
        "pmguard_agent_info",
        "gauge",
        "The running agent's version (always 1).",
    );
    let _ = writeln!(
        out,
        "pmguard_agent_info{{version=\"{}\"}} 1",
        escape_label(&status.version)
    );
    for fam in families() {
        let samples: Vec<(&str, f64)> = status
            .apps
            .iter()
            .filter_map(|a| {
                let a = a.borrow();
                (fam.value)(a).map(|v| (a.name.as_str(), v))
            })
            .collect();
        if samples.is_empty() {
            continue;
        }
        family_header(&mut out, fam.name, fam.kind, fam.help);
        for (app, v) in samples {
            let _ = writeln!(
                out,
                "{}{{app=\"{}\"}} {}",
                fam.name,
                escape_label(app),
                number(v)
            );
        }
    }
    encode_notify(&mut out, &status.notify);
    if !status.notify.is_empty() || status.notify_lost > 0 {
        let name = "pmguard_notify_lost_total";
        family_header(&mut out, name, "counter", "Alerts lost before a [[notify]] sink kept them (a full inbox, or the queue of a sink a reload removed) since the agent started; counted once, not per sink.");
        let _ = writeln!(out, "{name} {}", status.notify_lost);
    }
    out
}

/// The `[[notify]]` sinks' counters, one `sink` label (the sink's name, never its URL).
fn encode_notify(out: &mut String, sinks: &[SinkStatus]) {
    if sinks.is_empty() {
        return;
    }
    type Value = fn(&SinkStatus) -> f64;
    let families: [(&str, &str, &str, Value); 4] = [
        ("pmguard_notify_delivered_total", "counter", "Alerts a [[notify]] sink delivered (2xx) since the agent started.", |s| s.delivered as f64),
        ("pmguard_notify_dropped_total", "counter", "Alerts a [[notify]] sink dropped (refused with a 4xx, or pushed out of a full queue) since the agent started.", |s| s.dropped as f64),
        ("pmguard_notify_held_back_total", "counter", "Alerts held back by a [[notify]] sink's rate limit since the agent started.", |s| s.held_back as f64),
        ("pmguard_notify_queued", "gauge", "Alerts a [[notify]] sink has accepted and not yet delivered (spooled).", |s| s.queued as f64),
    ];
    for (name, kind, help, value) in families {
        family_header(out, name, kind, help);
        for s in sinks {
            let _ = writeln!(
                out,
                "{name}{{sink=\"{}\"}} {}",
                escape_label(&s.name),
                number(value(s))
            );
        }
    }
}

fn family_header(out: &mut String, name: &str, kind: &str, help: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the format wants it: `\`, `"` and newline escaped.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A sample value: integers without a fraction, others as Rust prints them (both valid Go floats).
fn number(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// The textfile: written atomically (mode 0644: node_exporter runs as another user), only into a
/// directory that exists; a failure is logged at most once every 10 minutes.
#[derive(Debug)]
pub struct Textfile {
    pub path: PathBuf,
    last_warned: Option<Mono>,
}

impl Textfile {
    pub fn new(path: &Path) -> Textfile {
        Textfile {
            path: path.to_path_buf(),
            last_warned: None,
        }
    }

    pub fn write(&mut self, text: &str) {
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        let result = if dir.is_dir() {
            files::write_atomic(&self.path, text.as_bytes(), 0o644, false)
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "its directory does not exist (pmguard does not create it: node_exporter's textfile directory must)",
            ))
        };
        if let Err(error) = result {
            let now = clock::mono_now();
            if self
                .last_warned
                .is_none_or(|t| now.saturating_sub(t) >= 600_000)
            {
                self.last_warned = Some(now);
                tracing::warn!(message = "Cannot write the Prometheus textfile.", path = %self.path.display(), %error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::pauses::Pause;
    use crate::report::state::{InstanceStatus, ProbeRecord};
    use std::collections::VecDeque;

    fn app(name: &str) -> AppStatus {
        AppStatus {
            name: name.into(),
            health: Health::Healthy,
            failures: 0,
            max_retries: 3,
            checks: 42,
            note: None,
            last_check_ms: Some(1),
            instances: vec![InstanceStatus {
                pm_id: 0,
                pid: 10,
                status: "online".into(),
                cpu_pct: Some(12.5),
                memory: 52_428_800,
                restart_time: 2,
                err_log: None,
            }],
            probes: VecDeque::from([ProbeRecord {
                ts_ms: 1,
                ok: true,
                latency_ms: 7,
                result: "http 200".into(),
                cert_days: None,
            }]),
            restarts: VecDeque::new(),
            paused: None,
        }
    }

    fn status(apps: Vec<AppStatus>) -> StatusFile {
        StatusFile {
            pid: 1,
            version: "0.1.0".into(),
            boot_epoch: 1_700_000_000_000,
            heartbeat: 5_000,
            updated_at: String::new(),
            interval_ms: 1_000,
            pauses_revision: 0,
            fresh_on_read: false,
            apps,
            notify: Vec::new(),
            notify_lost: 0,
        }
    }

    #[test]
    fn every_app_gets_each_metric_in_base_units() {
        let text = encode(&status(vec![app("web")]));
        for line in [
            "pmguard_heartbeat_timestamp_seconds 1700000005",
            "pmguard_up{app=\"web\"} 1",
            "pmguard_checks_total{app=\"web\"} 42",
            "pmguard_restarts_total{app=\"web\"} 2",
            "pmguard_response_time_seconds{app=\"web\"} 0.007",
            "pmguard_cpu_ratio{app=\"web\"} 0.125",
            "pmguard_memory_bytes{app=\"web\"} 52428800",
            "pmguard_paused{app=\"web\"} 0",
            "# TYPE pmguard_restarts_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        assert!(
            !text.contains("paused_until"),
            "no sample, no family:\n{text}"
        );
    }

    #[test]
    fn a_paused_app_says_so_and_until_when() {
        let mut a = app("web");
        a.health = Health::Failing;
        a.paused = Some(Pause {
            since_ms: 0,
            until_ms: 1_700_000_600_000,
            reason: None,
            by: None,
        });
        let text = encode(&status(vec![a]));
        assert!(text.contains("pmguard_up{app=\"web\"} 0\n"), "{text}");
        assert!(text.contains("pmguard_paused{app=\"web\"} 1\n"), "{text}");
        assert!(
            text.contains("pmguard_paused_until_timestamp_seconds{app=\"web\"} 1700000600\n"),
            "{text}"
        );
    }

    #[test]
    fn notify_sinks_get_counters_by_name_never_url() {
        let mut st = status(vec![app("web")]);
        st.notify = vec![SinkStatus {
            name: "ops-slack".into(),
            kind: "slack".into(),
            url: "https://hooks.slack.com/…".into(),
            queued: 2,
            delivered: 7,
            dropped: 1,
            held_back: 3,
            ..SinkStatus::default()
        }];
        st.notify_lost = 4;
        let text = encode(&st);
        for line in [
            "pmguard_notify_delivered_total{sink=\"ops-slack\"} 7",
            "pmguard_notify_dropped_total{sink=\"ops-slack\"} 1",
            "pmguard_notify_held_back_total{sink=\"ops-slack\"} 3",
            "pmguard_notify_queued{sink=\"ops-slack\"} 2",
            "# TYPE pmguard_notify_queued gauge",
            "pmguard_notify_lost_total 4",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        assert!(!text.contains("hooks.slack.com"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
