//! The agent's configuration file (TOML): its format, its defaults and its validation.
//!
//! Both binaries read this file, so this module owns the format. Parsing never stops at the first
//! problem: every unknown key, wrong type and out-of-range value is collected with its line and
//! column and a sentence that says how to fix it, so one edit-and-validate cycle fixes them all.
//! A `Config` that exists is valid: every later stage relies on the ranges checked here.

pub mod bytes;
pub mod duration;
mod memory;
pub mod notify;
mod probes;
mod read;
mod sections;
pub mod target;

use std::fmt;

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::ImDocument;

use read::Cx;
use target::ProbeSpec;

/// A whole, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (used in messages and to reload on SIGHUP).
    pub path: PathBuf,
    pub agent: AgentConfig,
    pub apps: Vec<AppConfig>,
    /// `[aws]`: metrics, events and alerts to CloudWatch, CloudWatch Logs and SNS. Without the
    /// section the agent is fully local and runs no AWS code.
    pub aws: Option<AwsConfig>,
    /// `[[notify]]`: alerts to webhooks and Slack-compatible chats (none by default).
    pub notify: Vec<NotifyConfig>,
}

pub use notify::{NotifyConfig, NotifyEvent, NotifyKind};

/// `[aws]`: where the agent sends metrics, events and alerts. No credentials here: the agent uses
/// the standard AWS chain (environment, profile, the instance profile through IMDSv2 on EC2).
#[derive(Debug, Clone, PartialEq)]
pub struct AwsConfig {
    /// AWS region (default: the SDK chain: AWS_REGION, the profile, IMDSv2 on EC2).
    pub region: Option<String>,
    /// CloudWatch namespace of the metrics (default "PM2/CodeBox"; may not start with "AWS/").
    pub namespace: String,
    /// CloudWatch Logs group of the events (default "/aws/ec2/pm2-health"); one stream per instance.
    pub log_group: String,
    /// Retention set on the log group when the agent has to create it (default 30; one of
    /// CloudWatch's values 1, 3, 5, 7, 14, 30, 60, 90, ... 3653).
    pub log_retention_days: u32,
    /// SNS topic NAME (not ARN) for alerts on crash-loop give-ups and kill escalations; alerts are
    /// published only when it is set. Resolved to its ARN with CreateTopic (idempotent).
    pub sns_topic: Option<String>,
    /// Address the installer subscribes to the topic and the alarms (the agent does not use it).
    pub alarm_email: Option<String>,
    /// How often the aggregated metrics and the buffered events are sent (default "60s").
    pub flush_interval: Duration,
    /// Send metrics at 1-second storage resolution (default false: 60 s, the cheaper standard).
    pub high_resolution: bool,
    /// The `InstanceId` dimension and log stream name (default: the EC2 instance id from IMDSv2,
    /// else the host name). 1 to 255 characters. Characters CloudWatch refuses in a dimension
    /// value (anything but printable ASCII) or CloudWatch Logs in a stream name (`:`, `*`) are
    /// sent percent-encoded, `höst` as `h%C3%B6st`, everywhere the name is used (metrics, log
    /// stream, alarms), and `validate` warns; set an ASCII name to choose it yourself.
    pub instance_id: Option<String>,
    /// `instance_id` as written in the file, when it had to be encoded (for the warning).
    pub instance_id_written: Option<String>,
    /// Service-Down alarm (provision-aws): no passing check for this many minutes (default 10).
    pub alarm_down_minutes: u32,
    /// Fleet name (1 to 64 of A-Z a-z 0-9 - _): every instance with the same `fleet` shares one
    /// topic, one log group and one set of alarms per app (CloudWatch Metrics Insights, GROUP BY
    /// InstanceId) that `pmguard provision-aws` creates once; instances create nothing shared.
    /// It also names the defaults `log_group = "/pmguard/<fleet>"` and
    /// `sns_topic = "pmguard-<fleet>-alerts"`. Unset: single-box mode (alarms per instance).
    pub fleet: Option<String>,
    /// With `fleet`: the Auto Scaling group the fleet runs in. Its `GroupInServiceInstances`
    /// (group metrics collection enabled) is compared with the instances that send heartbeats,
    /// so an agent or box that dies while in service alarms, and a scale-in does not.
    pub auto_scaling_group: Option<String>,
    /// High-Error-Rate alarm: more than this many failed checks in 5 minutes (default 3).
    pub alarm_failures: u32,
    /// Frequent-Restarts alarm: more than this many restarts in 15 minutes (default 2).
    pub alarm_restarts: u32,
}

/// `[agent]`: settings of the agent process itself.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// Check period of a healthy app (default "10s"; an app may override it).
    pub interval: Duration,
    /// Where the agent keeps its heartbeat, status, restart history and event file
    /// (default "/var/lib/pmguard"). Created mode 0750 if missing.
    pub state_dir: PathBuf,
    /// PM2's home directory (default: $PM2_HOME, else ~/.pm2 of the running user).
    pub pm2_home: Option<PathBuf>,
    /// The `pm2` command, used only to bring a dead PM2 daemon back (`pm2 resurrect`); never per check.
    pub pm2_bin: String,
    /// Run `pm2 resurrect` when the PM2 daemon is gone (default true).
    pub resurrect: bool,
    /// The event file (`events.jsonl` in `state_dir`) is rotated once it reaches this size
    /// (default 16 MiB); one rotated file is kept.
    pub events_max_bytes: u64,
    /// Also write a line to `events.jsonl` for every passing check (default false: failing
    /// checks, state changes and actions only; `status` always shows the last probes).
    pub log_passing_checks: bool,
    /// Also write the apps' state in Prometheus' text format to this file (for node_exporter's
    /// textfile collector), atomically, mode 0644, once per check period; only if its directory
    /// exists. No port is opened.
    pub prometheus_textfile: Option<PathBuf>,
}

/// One `[[apps]]` entry: a PM2 app to watch.
#[derive(Debug, Clone, PartialEq)]
pub struct AppConfig {
    /// The PM2 app name (as in `pm2 list`). A cluster app's instances are judged one by one.
    pub name: String,
    /// Check period while healthy (default: `[agent] interval`).
    pub interval: Duration,
    /// Per-probe deadline, connect to last byte (default "5s"; a `[[apps.probes]]` may set its
    /// own).
    pub timeout: Duration,
    /// The app's probes; every one must pass for a check to pass. The section's own
    /// `health_url` or `tcp` (with its request and expect keys) is the first; each
    /// `[[apps.probes]]` adds one. None: the app is judged by its PM2 state and CPU alone.
    pub probes: Vec<ProbeSpec>,
    /// Consecutive failed checks before a restart (default 3).
    pub max_retries: u32,
    /// Check period after a failure (default "10s").
    pub retry_interval: Duration,
    /// Minimum time between two restarts of this app (default "60s").
    pub restart_cooldown: Duration,
    /// CPU, in % of one core, that counts as stuck when sustained (default 90).
    pub cpu_threshold: f64,
    /// How long the CPU must stay at or above `cpu_threshold` to count as stuck (default "60s").
    pub cpu_duration: Duration,
    /// After the agent starts or the app (re)starts, failures do not count until the first
    /// passing check or until this has passed (default "30s").
    pub startup_grace: Duration,
    /// How long PM2 may take to restart the app beyond its own `kill_timeout` before the agent
    /// escalates with SIGKILL (default "10s").
    pub restart_timeout: Duration,
    /// Crash-loop protection: this many restarts by the agent ... (default 5)
    pub crashloop_restarts: u32,
    /// ... within this window (default "15m") make the agent stop restarting and raise an alert.
    pub crashloop_window: Duration,
    /// First pause after a crash-loop give-up before trying again (default "5m"); doubles each time.
    pub crashloop_backoff: Duration,
    /// Longest pause between tries of a crash-looping app (default "1h").
    pub crashloop_backoff_max: Duration,
    /// The tree rules: `memory_limit`, `memory_duration`, `cpu_scope` (see `memory`).
    pub tree: TreeRules,
}

pub use memory::{CpuScope, TreeRules};

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub help: Option<String>,
}

/// Why a config could not be used: every problem, each with its place in the file.
#[derive(Debug)]
pub enum ConfigError {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, source } => {
                write!(f, "cannot read config {}: {source}", path.display())
            }
            ConfigError::Invalid { path, problems } => {
                let n = problems.len();
                write!(
                    f,
                    "{} has {n} problem{}:",
                    path.display(),
                    if n == 1 { "" } else { "s" }
                )?;
                for p in problems {
                    write!(
                        f,
                        "\n{}:{}:{}: {}",
                        path.display(),
                        p.line,
                        p.column,
                        p.message
                    )?;
                    if let Some(help) = &p.help {
                        write!(f, "\n  help: {help}")?;
                    }
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

const SECTIONS: &[&str] = &["agent", "aws", "apps", "notify"];

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// `load`, and each `[[notify]]` `url_file` read into its sink's `url` (problems point at
    /// the `url_file` line): for `validate`, `run` and a reload, the commands that need the
    /// secret. The others (`status`, `check`, `pause`, the installer) never read it, so a file
    /// only the agent's user can read does not stop them.
    /// Each `url_file` is judged for this process's user: the running agent's reload.
    pub fn load_with_url_files(path: &Path) -> Result<Config, ConfigError> {
        let mut config = Config::load(path)?;
        config.read_url_files(&crate::sys::privilege::AgentUser::current())?;
        Ok(config)
    }

    /// Reads each `[[notify]]` `url_file` into its sink's `url`, judging the file for `agent`,
    /// the user who reads it at every reload (`sys::privilege::agent_user`): under sudo,
    /// `validate` passes a file the agent's user owns, and refuses one it could not read.
    pub fn read_url_files(
        &mut self,
        agent: &crate::sys::privilege::AgentUser,
    ) -> Result<(), ConfigError> {
        let problems = notify::resolve_url_files(&mut self.notify, agent);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: self.path.clone(),
                problems,
            });
        }
        Ok(())
    }

    /// Validates config text; `path` is only used in messages and kept in the result. A
    /// `[[notify]]` `url_file` is not read here (its sink's `url` stays `None`; see
    /// `load_with_url_files`).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut cx = Cx {
            src: text,
            problems: Vec::new(),
        };
        let config = match ImDocument::parse(text) {
            Ok(doc) => cx.config(path, doc.as_table()),
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let message = e.message().trim().to_string();
                cx.problem(span, format!("invalid TOML: {message}"), None);
                None
            }
        };
        cx.problems.sort_by_key(|p| (p.line, p.column));
        match config {
            Some(c) if cx.problems.is_empty() => Ok(c),
            _ => Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems: cx.problems,
            }),
        }
    }

    /// What is valid but insecure or lossy, for `validate` to say loudly: each probe that does
    /// not verify its TLS certificate; with `[aws]`, each app whose name CloudWatch refuses as a
    /// dimension value (its metrics are dropped; its events and alerts still go out), and an
    /// `instance_id` that is sent encoded.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(aws) = &self.aws {
            if let (Some(written), Some(sent)) = (&aws.instance_id_written, &aws.instance_id) {
                out.push(format!(
                    "instance_id `{written}`: CloudWatch refuses it as a dimension value (printable ASCII only), so it is sent as `{sent}` (the InstanceId dimension, the log stream, the alarms); set an ASCII instance_id to choose the name"
                ));
            }
            for app in &self.apps {
                if !crate::aws::metrics::dimension_value_ok(&app.name) {
                    out.push(format!(
                        "app `{}`: CloudWatch refuses this name as a dimension value (printable ASCII only), so its metrics are not sent (events and alerts are); rename the PM2 app with ASCII characters",
                        app.name
                    ));
                }
            }
        }
        for app in &self.apps {
            for p in &app.probes {
                if let target::ProbeKind::Http(h) = &p.kind {
                    if h.tls.as_ref().is_some_and(|t| !t.verify) {
                        out.push(format!(
                            "app `{}`: tls_verify = false: {} is probed WITHOUT verifying its certificate (anyone who can answer on that address passes the check)",
                            app.name,
                            p.describe()
                        ));
                    }
                }
            }
        }
        out
    }

    pub fn app(&self, name: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|a| a.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::read::{ms, secs};
    use super::sections::namespace_problem;
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/pmguard/pmguard.toml"), text)
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn seed_defaults_apply() {
        let c = parse(
            "[[apps]]\nname = \"codebox\"\nhealth_url = \"http://localhost:5000/api-health\"\n",
        )
        .unwrap();
        let a = &c.apps[0];
        assert_eq!(c.agent.interval, secs(10));
        assert_eq!(c.agent.state_dir, PathBuf::from("/var/lib/pmguard"));
        assert_eq!(a.max_retries, 3);
        assert_eq!(a.retry_interval, secs(10));
        assert_eq!(a.restart_cooldown, secs(60));
        assert_eq!(a.cpu_threshold, 90.0);
        assert_eq!(a.cpu_duration, secs(60));
        assert_eq!(a.startup_grace, secs(30));
        assert_eq!(a.timeout, secs(5));
        assert_eq!(a.interval, secs(10));
        let url = match &a.probes[..] {
            [target::ProbeSpec {
                kind: target::ProbeKind::Http(h),
                ..
            }] => &h.url,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("localhost", 5000, "/api-health")
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = "[agent]\ninterval = 10\nstate_dir = \"relative\"\n\n[[apps]]\nname = \"codebox\"\nmax_retries = 0\nretry_intervall = \"10s\"\ntimeout = \"5 s\"\ncpu_threshold = \"90\"\n";
        let p = problems(text);
        let lines: Vec<usize> = p.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![2, 3, 7, 8, 9, 10], "{p:#?}");
        assert_eq!(p[0].message, "`interval` = 10 has no unit");
        assert!(p[0].help.as_ref().unwrap().contains("interval = \"10s\""));
        assert_eq!(p[3].message, "unknown key `retry_intervall` in [[apps]]");
        assert_eq!(p[3].help.as_deref(), Some("did you mean `retry_interval`?"));
        assert_eq!(p[2].message, "max_retries must be 1..=100, not 0");
        assert_eq!(p[2].column, 15);
    }

    #[test]
    fn display_names_file_line_and_fix() {
        let err = parse("[[apps]]\nname = \"web\"\nmax_retries = 500\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/etc/pmguard/pmguard.toml:3:15: max_retries must be 1..=100, not 500"),
            "{text}"
        );
        assert!(
            text.contains("help: set max_retries to a whole number from 1 to 100 (default 3)"),
            "{text}"
        );
    }

    #[test]
    fn structural_mistakes() {
        assert_eq!(problems("[agent]\n")[0].message, "no apps to watch");
        let p = problems("[[apps]]\nhealth_url = \"http://x/\"\n");
        assert_eq!(p[0].message, "an [[apps]] section has no `name`");
        let p = problems("[[apps]]\nname = \"a\"\n[[apps]]\nname = \"a\"\n");
        assert_eq!(
            (p[0].line, p[0].message.as_str()),
            (4, "app `a` is listed twice")
        );
        let p = problems("[awz]\nregion = \"x\"\n[[apps]]\nname = \"a\"\n");
        assert_eq!(p[0].message, "unknown section `awz`");
        assert_eq!(p[0].help.as_deref(), Some("did you mean `aws`?"));
        let p = problems("[[apps]]\nname = \"a\"\nhealth_url = \"ftp://127.0.0.1/h\"\n");
        assert!(p[0].message.contains("https://"), "{p:?}");
        let p = problems("[[apps]\nname = 1");
        assert!(p[0].message.starts_with("invalid TOML"), "{p:?}");
        assert_eq!(p[0].line, 1);
    }

    #[test]
    fn expect_status_forms() {
        let status = |c: &Config| match &c.apps[0].probes[0].kind {
            target::ProbeKind::Http(h) => h.expect.status.clone(),
            other => panic!("{other:?}"),
        };
        let url = "health_url = \"http://127.0.0.1:1/\"\n";
        let c = parse(&format!(
            "[[apps]]\nname = \"a\"\n{url}expect_status = [200, 204]\n"
        ))
        .unwrap();
        assert!(status(&c).accepts(204));
        assert!(!status(&c).accepts(201));
        let c = parse(&format!("[[apps]]\nname = \"a\"\n{url}")).unwrap();
        assert!(status(&c).accepts(201));
        assert!(!status(&c).accepts(500));
        let p = problems(&format!(
            "[[apps]]\nname = \"a\"\n{url}expect_status = 700\n"
        ));
        assert_eq!(p[0].line, 4);
    }

    #[test]
    fn per_app_interval_defaults_to_agent_interval() {
        let c = parse("[agent]\ninterval = \"2s\"\n[[apps]]\nname = \"a\"\n[[apps]]\nname = \"b\"\ninterval = \"500ms\"\n").unwrap();
        assert_eq!(c.apps[0].interval, secs(2));
        assert_eq!(c.apps[1].interval, ms(500));
    }

    #[test]
    fn aws_section_is_optional_and_has_defaults() {
        let c = parse("[[apps]]\nname = \"a\"\n").unwrap();
        assert_eq!(c.aws, None);
        let c = parse("[aws]\n[[apps]]\nname = \"a\"\n").unwrap();
        let aws = c.aws.unwrap();
        assert_eq!(aws.region, None);
        assert_eq!(aws.namespace, "PM2/CodeBox");
        assert_eq!(aws.log_group, "/aws/ec2/pm2-health");
        assert_eq!(aws.log_retention_days, 30);
        assert_eq!(aws.sns_topic, None);
        assert_eq!(aws.alarm_email, None);
        assert_eq!(aws.flush_interval, secs(60));
        assert!(!aws.high_resolution);
        assert_eq!(aws.instance_id, None);
    }

    #[test]
    fn aws_section_full() {
        let c = parse("[aws]\nregion = \"eu-west-3\"\nnamespace = \"Acme/Web\"\nlog_group = \"/acme/web\"\nlog_retention_days = 14\nsns_topic = \"pmguard-alerts\"\nalarm_email = \"ops@example.com\"\nflush_interval = \"1s\"\nhigh_resolution = true\ninstance_id = \"web-1\"\n[[apps]]\nname = \"a\"\n").unwrap();
        let aws = c.aws.unwrap();
        assert_eq!(aws.region.as_deref(), Some("eu-west-3"));
        assert_eq!(aws.namespace, "Acme/Web");
        assert_eq!(aws.log_group, "/acme/web");
        assert_eq!(aws.log_retention_days, 14);
        assert_eq!(aws.sns_topic.as_deref(), Some("pmguard-alerts"));
        assert_eq!(aws.alarm_email.as_deref(), Some("ops@example.com"));
        assert_eq!(aws.flush_interval, secs(1));
        assert!(aws.high_resolution);
        assert_eq!(aws.instance_id.as_deref(), Some("web-1"));
    }

    #[test]
    fn names_cloudwatch_refuses_as_dimensions_are_caught_by_validate() {
        let p = problems("[aws]\ninstance_id = \"   \"\n[[apps]]\nname = \"a\"\n");
        assert!(
            p[0].message
                .starts_with("instance_id must be 1 to 255 characters"),
            "{p:?}"
        );
        assert_eq!(p[0].line, 2);
        let long = format!(
            "[aws]\ninstance_id = \"{}\"\n[[apps]]\nname = \"a\"\n",
            "é".repeat(50)
        );
        assert_eq!(problems(&long).len(), 1, "300 bytes once encoded");
        let c = parse("[aws]\n[[apps]]\nname = \"café\"\n[[apps]]\nname = \"web\"\n").unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("app `café`: CloudWatch refuses") && w[0].contains("rename"));
        assert!(parse("[[apps]]\nname = \"café\"\n")
            .unwrap()
            .warnings()
            .is_empty());
    }

    #[test]
    fn a_non_ascii_instance_id_is_a_warning_and_sent_encoded() {
        let c = parse("[aws]\ninstance_id = \"höst\"\n[[apps]]\nname = \"a\"\n").unwrap();
        let aws = c.aws.as_ref().unwrap();
        assert_eq!(aws.instance_id.as_deref(), Some("h%C3%B6st"));
        assert_eq!(aws.instance_id_written.as_deref(), Some("höst"));
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("instance_id `höst`: CloudWatch refuses")
                && w[0].contains("sent as `h%C3%B6st`"),
            "{w:?}"
        );
        let c = parse("[aws]\ninstance_id = \"web-1\"\n[[apps]]\nname = \"a\"\n").unwrap();
        assert_eq!(c.aws.as_ref().unwrap().instance_id_written, None);
        assert!(c.warnings().is_empty());
    }

    #[test]
    fn aws_problems_are_all_reported_with_their_place() {
        let text = "[aws]\nregion = \"Paris\"\nnamespace = \"AWS/EC2\"\nlog_group = \"bad group\"\nlog_retention_days = 31\nsns_topic = \"arn:aws:sns:us-east-1:123456789012:alerts\"\nalarm_email = \"ops\"\nflush_interval = \"500ms\"\nhigh_resolution = \"yes\"\ninstance_id = \"\"\nkey_id = \"AKIA\"\n[[apps]]\nname = \"a\"\n";
        let p = problems(text);
        let lines: Vec<usize> = p.iter().map(|p| p.line).collect();
        assert_eq!(lines, (2..=11).collect::<Vec<_>>(), "{p:#?}");
        assert_eq!(p[0].message, "region `Paris` is not an AWS region name");
        assert_eq!(
            p[1].message,
            "namespace `AWS/EC2` starts with `AWS/`, which is reserved for AWS services"
        );
        assert_eq!(p[1].column, 13);
        assert!(p[2].message.contains("not a CloudWatch Logs group name"));
        assert!(p[3].message.contains("not 31"), "{}", p[3].message);
        assert!(p[3].help.as_ref().unwrap().contains("1, 3, 5, 7, 14, 30"));
        assert_eq!(p[4].message, "sns_topic is an ARN; give the topic name");
        assert!(p[4]
            .help
            .as_ref()
            .unwrap()
            .contains("sns_topic = \"alerts\""));
        assert!(p[5].message.contains("not an email address"));
        assert_eq!(
            p[6].message,
            "flush_interval must be from 1s to 1h, not 500ms"
        );
        assert!(p[7].message.contains("true or false"));
        assert!(p[8].message.starts_with("instance_id"));
        assert_eq!(p[9].message, "unknown key `key_id` in [aws]");
    }

    #[test]
    fn aws_must_be_a_table_and_names_are_checked() {
        let p = problems("aws = 1\n[[apps]]\nname = \"a\"\n");
        assert_eq!(p[0].message, "`aws` must be a table");
        assert!(namespace_problem("PM2/CodeBox").is_none());
        assert!(namespace_problem("My App:prod #1").is_none());
        assert!(namespace_problem("").is_some());
        assert!(namespace_problem("a\u{e9}").is_some());
        assert!(namespace_problem(&"x".repeat(256)).is_some());
        let p = problems("[aws]\nsns_topic = \"alerts.fifo\"\n[[apps]]\nname = \"a\"\n");
        assert!(p[0].message.contains("not an SNS topic name"));
    }

    #[test]
    fn a_fleet_names_the_shared_log_group_and_topic() {
        let aws = parse("[aws]\nfleet = \"web\"\n[[apps]]\nname = \"a\"\n")
            .unwrap()
            .aws
            .unwrap();
        assert_eq!(aws.fleet.as_deref(), Some("web"));
        assert_eq!(aws.log_group, "/pmguard/web");
        assert_eq!(aws.sns_topic.as_deref(), Some("pmguard-web-alerts"));
        assert_eq!(aws.auto_scaling_group, None);
        let aws = parse("[aws]\nfleet = \"web\"\nlog_group = \"/x\"\nsns_topic = \"t\"\nauto_scaling_group = \"web-asg\"\n[[apps]]\nname = \"a\"\n")
            .unwrap()
            .aws
            .unwrap();
        assert_eq!(
            (aws.log_group.as_str(), aws.sns_topic.as_deref()),
            ("/x", Some("t"))
        );
        assert_eq!(aws.auto_scaling_group.as_deref(), Some("web-asg"));
        let single = parse("[aws]\n[[apps]]\nname = \"a\"\n")
            .unwrap()
            .aws
            .unwrap();
        assert_eq!((single.fleet, single.sns_topic), (None, None));
    }

    #[test]
    fn a_fleet_name_is_checked_and_an_asg_needs_a_fleet() {
        let p = problems("[aws]\nfleet = \"web fleet\"\n[[apps]]\nname = \"a\"\n");
        assert_eq!(p[0].message, "fleet `web fleet` is not a fleet name");
        assert_eq!(p[0].line, 2);
        let p = problems("[aws]\nauto_scaling_group = \"asg\"\n[[apps]]\nname = \"a\"\n");
        assert_eq!(p[0].message, "auto_scaling_group needs `fleet`");
    }

    #[test]
    fn the_known_keys_are_the_keys_the_reader_reads() {
        let err = parse("[agent]\nzzzzzzzz = 1\n[[apps]]\nname = \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the keys of [agent] are: interval, state_dir, pm2_home, pm2_bin, resurrect, events_max_bytes, log_passing_checks, prometheus_textfile"),
            "{err}"
        );
        // A key read by the code is never reported unknown, whichever section it sits in.
        let err = parse("[[apps]]\nname = \"a\"\ncrashloop_backof = \"1m\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `crashloop_backoff`?"), "{err}");
    }
}
