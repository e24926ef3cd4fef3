//! The agent's configuration file (TOML): its format, its defaults and its validation.
//!
//! Both binaries read this file, so this module owns the format. Parsing never stops at the first
//! problem: every unknown key, wrong type and out-of-range value is collected with its line and
//! column and a sentence that says how to fix it, so one edit-and-validate cycle fixes them all.
//! A `Config` that exists is valid: every later stage relies on the ranges checked here.

pub mod duration;
pub mod target;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{ImDocument, Item, Table, Value};

use target::{HttpTarget, StatusMatch};

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
}

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
    /// else the host name).
    pub instance_id: Option<String>,
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
}

/// One `[[apps]]` entry: a PM2 app to watch.
#[derive(Debug, Clone, PartialEq)]
pub struct AppConfig {
    /// The PM2 app name (as in `pm2 list`). A cluster app's instances are judged one by one.
    pub name: String,
    /// The HTTP endpoint to probe (http only; probe the app's local port). Without it the app is
    /// judged by its PM2 state and CPU alone.
    pub health_url: Option<HttpTarget>,
    /// Check period while healthy (default: `[agent] interval`).
    pub interval: Duration,
    /// Per-probe deadline, connect to last byte (default "5s").
    pub timeout: Duration,
    /// HTTP statuses that pass (default: any 2xx). An integer or a list of integers.
    pub expect_status: StatusMatch,
    /// A substring the response body must contain (default: none).
    pub expect_body: Option<String>,
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
}

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

const AGENT_KEYS: &[&str] = &[
    "interval",
    "state_dir",
    "pm2_home",
    "pm2_bin",
    "resurrect",
    "events_max_bytes",
    "log_passing_checks",
];
const SECTIONS: &[&str] = &["agent", "aws", "apps"];
const AWS_KEYS: &[&str] = &[
    "region",
    "namespace",
    "log_group",
    "log_retention_days",
    "sns_topic",
    "alarm_email",
    "flush_interval",
    "high_resolution",
    "instance_id",
    "alarm_down_minutes",
    "alarm_failures",
    "alarm_restarts",
    "fleet",
    "auto_scaling_group",
];
const APP_KEYS: &[&str] = &[
    "name",
    "health_url",
    "interval",
    "timeout",
    "expect_status",
    "expect_body",
    "max_retries",
    "retry_interval",
    "restart_cooldown",
    "cpu_threshold",
    "cpu_duration",
    "startup_grace",
    "restart_timeout",
    "crashloop_restarts",
    "crashloop_window",
    "crashloop_backoff",
    "crashloop_backoff_max",
];

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Validates config text; `path` is only used in messages and kept in the result.
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

    pub fn app(&self, name: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|a| a.name == name)
    }
}

/// Collects problems while walking the document.
struct Cx<'s> {
    src: &'s str,
    problems: Vec<Problem>,
}

impl Cx<'_> {
    fn problem(&mut self, span: Range<usize>, message: String, help: Option<String>) {
        let at = span.start.min(self.src.len());
        let before = &self.src[..at];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        self.problems.push(Problem {
            line,
            column,
            message,
            help,
        });
    }

    fn config(&mut self, path: &Path, root: &Table) -> Option<Config> {
        let whole = 0..0;
        for (key, _) in root.iter() {
            if !SECTIONS.contains(&key) {
                let span = key_span(root, key);
                let help = suggest(key, SECTIONS).map_or_else(
                    || "the sections are [agent], [aws] and [[apps]]".to_string(),
                    |s| format!("did you mean `{s}`?"),
                );
                self.problem(span, format!("unknown section `{key}`"), Some(help));
            }
        }
        let agent = match root.get("agent") {
            None => self.agent(&Table::new()),
            Some(Item::Table(t)) => self.agent(t),
            Some(other) => {
                self.problem(
                    other.span().unwrap_or(whole.clone()),
                    "`agent` must be a table".into(),
                    Some("write it as a section: [agent]".into()),
                );
                self.agent(&Table::new())
            }
        };
        let aws = match root.get("aws") {
            None => None,
            Some(Item::Table(t)) => Some(self.aws(t)),
            Some(other) => {
                self.problem(
                    other.span().unwrap_or(whole.clone()),
                    "`aws` must be a table".into(),
                    Some("write it as a section: [aws]".into()),
                );
                None
            }
        };
        let mut apps = Vec::new();
        match root.get("apps") {
            None => self.problem(
                whole,
                "no apps to watch".into(),
                Some("add at least one [[apps]] section with `name = \"<pm2 app name>\"`".into()),
            ),
            Some(Item::ArrayOfTables(list)) => {
                for table in list.iter() {
                    if let Some(app) = self.app(table, &agent) {
                        if apps.iter().any(|a: &AppConfig| a.name == app.name) {
                            let span = value_span(table, "name");
                            self.problem(
                                span,
                                format!("app `{}` is listed twice", app.name),
                                Some("keep one [[apps]] section per PM2 app name".into()),
                            );
                        } else {
                            apps.push(app);
                        }
                    }
                }
            }
            Some(other) => self.problem(
                other.span().unwrap_or(0..0),
                "`apps` must be a list of tables".into(),
                Some("write each app as its own [[apps]] section".into()),
            ),
        }
        Some(Config {
            path: path.to_path_buf(),
            agent,
            apps,
            aws,
        })
    }

    fn aws(&mut self, t: &Table) -> AwsConfig {
        use crate::aws::names;
        self.unknown_keys(t, AWS_KEYS, "[aws]");
        let fleet = self.string(t, "fleet").map(|(f, span)| {
            let ok = !f.is_empty()
                && f.len() <= 64
                && f.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                self.problem(
                    span,
                    format!("fleet `{f}` is not a fleet name"),
                    Some("use 1 to 64 of A-Z a-z 0-9 - _, e.g. fleet = \"web\"".into()),
                );
            }
            f
        });
        let auto_scaling_group = self.string(t, "auto_scaling_group").map(|(g, span)| {
            if fleet.is_none() {
                self.problem(
                    span.clone(),
                    "auto_scaling_group needs `fleet`".into(),
                    Some("add fleet = \"<name>\" to [aws], or remove auto_scaling_group".into()),
                );
            }
            if g.is_empty() || g.len() > 255 || g.chars().any(char::is_control) {
                self.problem(
                    span,
                    "auto_scaling_group must be 1 to 255 printable characters".into(),
                    Some("write the Auto Scaling group's name as `aws autoscaling describe-auto-scaling-groups` shows it".into()),
                );
            }
            g
        });
        let region = self.string(t, "region").map(|(r, span)| {
            let ok = !r.is_empty()
                && r.len() <= 64
                && r.split('-').count() >= 3
                && r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                self.problem(
                    span,
                    format!("region `{r}` is not an AWS region name"),
                    Some("write a region such as \"us-east-1\", or remove the key to use the SDK chain (AWS_REGION, profile, IMDS)".into()),
                );
            }
            r
        });
        let namespace = self
            .string(t, "namespace")
            .map(|(n, span)| {
                if let Some(why) = namespace_problem(&n) {
                    self.problem(
                        span,
                        format!("namespace `{n}` {why}"),
                        Some(format!(
                            "use your own namespace, e.g. namespace = \"{}\" (the default)",
                            names::DEFAULT_NAMESPACE
                        )),
                    );
                }
                n
            })
            .unwrap_or_else(|| names::DEFAULT_NAMESPACE.to_string());
        let log_group = self
            .string(t, "log_group")
            .map(|(g, span)| {
                let ok = !g.is_empty()
                    && g.len() <= 512
                    && g.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/#".contains(&b));
                if !ok {
                    self.problem(
                        span,
                        format!("log_group `{g}` is not a CloudWatch Logs group name"),
                        Some(format!("use 1 to 512 of A-Z a-z 0-9 . _ - / #, e.g. log_group = \"{}\" (the default)", names::DEFAULT_LOG_GROUP)),
                    );
                }
                g
            })
            .unwrap_or_else(|| match &fleet {
                Some(f) => format!("/pmguard/{f}"),
                None => names::DEFAULT_LOG_GROUP.to_string(),
            });
        let log_retention_days = match self.value(t, "log_retention_days") {
            None => names::DEFAULT_LOG_RETENTION_DAYS,
            Some((v, span)) => match v.as_integer() {
                Some(n)
                    if u32::try_from(n).is_ok_and(|d| names::LOG_RETENTION_DAYS.contains(&d)) =>
                {
                    n as u32
                }
                other => {
                    let shown = other.map_or_else(|| v.type_name().to_string(), |n| n.to_string());
                    let list = names::LOG_RETENTION_DAYS
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ");
                    self.problem(
                        span,
                        format!("log_retention_days must be a retention CloudWatch Logs accepts, not {shown}"),
                        Some(format!("use one of {list} (default {})", names::DEFAULT_LOG_RETENTION_DAYS)),
                    );
                    names::DEFAULT_LOG_RETENTION_DAYS
                }
            },
        };
        let sns_topic = self.string(t, "sns_topic").map(|(n, span)| {
            if n.starts_with("arn:") {
                let name = n.rsplit(':').next().unwrap_or("");
                self.problem(
                    span,
                    "sns_topic is an ARN; give the topic name".into(),
                    Some(format!("write sns_topic = \"{name}\" (the agent resolves the ARN in the instance's account and region)")),
                );
            } else if n.is_empty()
                || n.len() > 256
                || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                self.problem(
                    span,
                    format!("sns_topic `{n}` is not an SNS topic name"),
                    Some("use 1 to 256 of A-Z a-z 0-9 - _ (a standard topic, not .fifo), e.g. sns_topic = \"pmguard-alerts\"".into()),
                );
            }
            n
        })
        .or_else(|| fleet.as_ref().map(|f| format!("pmguard-{f}-alerts")));
        let alarm_email = self.string(t, "alarm_email").map(|(e, span)| {
            let ok = e.split_once('@').is_some_and(|(user, host)| {
                !user.is_empty()
                    && host.contains('.')
                    && !host.starts_with('.')
                    && !host.ends_with('.')
            }) && !e.chars().any(|c| c.is_whitespace() || c.is_control())
                && e.matches('@').count() == 1;
            if !ok {
                self.problem(
                    span,
                    format!("alarm_email `{e}` is not an email address"),
                    Some("write one address, e.g. alarm_email = \"ops@example.com\"".into()),
                );
            }
            e
        });
        let flush_interval = self.duration(t, "flush_interval", secs(60), secs(1)..=secs(3600));
        let high_resolution = self.boolean(t, "high_resolution").unwrap_or(false);
        let instance_id = self.string(t, "instance_id").map(|(i, span)| {
            if i.trim().is_empty() || i.len() > 255 || i.chars().any(char::is_control) {
                self.problem(
                    span,
                    "instance_id must be 1 to 255 printable characters".into(),
                    Some(
                        "remove the key to use the EC2 instance id (or the host name off EC2)"
                            .into(),
                    ),
                );
            }
            i
        });
        let alarm_down_minutes = self.integer(t, "alarm_down_minutes", 10, 1..=1440) as u32;
        let alarm_failures = self.integer(t, "alarm_failures", 3, 0..=100_000) as u32;
        let alarm_restarts = self.integer(t, "alarm_restarts", 2, 0..=10_000) as u32;
        AwsConfig {
            region,
            namespace,
            log_group,
            log_retention_days,
            sns_topic,
            alarm_email,
            flush_interval,
            high_resolution,
            instance_id,
            alarm_down_minutes,
            alarm_failures,
            alarm_restarts,
            fleet,
            auto_scaling_group,
        }
    }

    fn agent(&mut self, t: &Table) -> AgentConfig {
        self.unknown_keys(t, AGENT_KEYS, "[agent]");
        let interval = self.duration(t, "interval", secs(10), ms(100)..=secs(3600));
        let state_dir = self
            .string(t, "state_dir")
            .map(|(s, span)| {
                let p = PathBuf::from(&s);
                if !p.is_absolute() {
                    self.problem(
                        span,
                        format!("state_dir `{s}` is not an absolute path"),
                        Some("write a full path, e.g. state_dir = \"/var/lib/pmguard\"".into()),
                    );
                }
                p
            })
            .unwrap_or_else(|| PathBuf::from("/var/lib/pmguard"));
        let pm2_home = self.string(t, "pm2_home").map(|(s, span)| {
            let p = PathBuf::from(&s);
            if !p.is_absolute() {
                self.problem(
                    span,
                    format!("pm2_home `{s}` is not an absolute path"),
                    Some("write a full path, e.g. pm2_home = \"/home/ubuntu/.pm2\"".into()),
                );
            }
            p
        });
        let pm2_bin = self
            .string(t, "pm2_bin")
            .map_or_else(|| "pm2".to_string(), |(s, _)| s);
        let resurrect = self.boolean(t, "resurrect").unwrap_or(true);
        let events_max_bytes =
            self.integer(t, "events_max_bytes", 16 << 20, 65_536..=(1 << 34)) as u64;
        let log_passing_checks = self.boolean(t, "log_passing_checks").unwrap_or(false);
        AgentConfig {
            interval,
            state_dir,
            pm2_home,
            pm2_bin,
            resurrect,
            events_max_bytes,
            log_passing_checks,
        }
    }

    fn app(&mut self, t: &Table, agent: &AgentConfig) -> Option<AppConfig> {
        self.unknown_keys(t, APP_KEYS, "[[apps]]");
        let name = match self.string(t, "name") {
            Some((n, span)) => {
                if n.trim().is_empty() || n.chars().any(char::is_control) {
                    self.problem(
                        span,
                        "name must be the PM2 app name, not empty".into(),
                        Some("copy it from the `name` column of `pm2 list`".into()),
                    );
                }
                n
            }
            None => {
                if !t.contains_key("name") {
                    self.problem(
                        t.span().unwrap_or(0..0),
                        "an [[apps]] section has no `name`".into(),
                        Some("add name = \"<pm2 app name>\" (as shown by `pm2 list`)".into()),
                    );
                }
                String::new()
            }
        };
        let health_url = self.string(t, "health_url").and_then(|(u, span)| {
            match HttpTarget::parse(&u) {
                Ok(target) => Some(target),
                Err(why) => {
                    // The message may reach events.jsonl (a reload refused): never the query.
                    let shown = u.split_once('?').map_or(u.clone(), |(b, _)| format!("{b}?<redacted>"));
                    self.problem(span, format!("health_url `{shown}`: {why}"), Some(
                        "write the app's local HTTP endpoint, e.g. \"http://127.0.0.1:5000/api-health\"".into(),
                    ));
                    None
                }
            }
        });
        let interval = self.duration(t, "interval", agent.interval, ms(100)..=secs(3600));
        let timeout = self.duration(t, "timeout", secs(5), ms(10)..=secs(300));
        let expect_status = self.status_match(t);
        let expect_body = self.string(t, "expect_body").map(|(s, span)| {
            if s.is_empty() {
                self.problem(
                    span,
                    "expect_body is empty".into(),
                    Some("remove the key, or give the text a healthy reply contains".into()),
                );
            }
            s
        });
        let max_retries = self.integer(t, "max_retries", 3, 1..=100) as u32;
        let retry_interval = self.duration(t, "retry_interval", secs(10), ms(100)..=secs(3600));
        let restart_cooldown =
            self.duration(t, "restart_cooldown", secs(60), secs(0)..=secs(86_400));
        let cpu_threshold = self.number(t, "cpu_threshold", 90.0, 1.0..=6400.0);
        let cpu_duration = self.duration(t, "cpu_duration", secs(60), ms(100)..=secs(86_400));
        let startup_grace = self.duration(t, "startup_grace", secs(30), secs(0)..=secs(3600));
        let restart_timeout = self.duration(t, "restart_timeout", secs(10), secs(1)..=secs(600));
        let crashloop_restarts = self.integer(t, "crashloop_restarts", 5, 1..=1000) as u32;
        let crashloop_window =
            self.duration(t, "crashloop_window", secs(900), secs(1)..=secs(86_400));
        let crashloop_backoff =
            self.duration(t, "crashloop_backoff", secs(300), secs(1)..=secs(86_400));
        let crashloop_backoff_max = self.duration(
            t,
            "crashloop_backoff_max",
            secs(3600),
            secs(1)..=secs(604_800),
        );
        if crashloop_backoff_max < crashloop_backoff {
            self.problem(
                value_span(t, "crashloop_backoff_max"),
                format!(
                    "crashloop_backoff_max ({}) is shorter than crashloop_backoff ({})",
                    duration::format(crashloop_backoff_max),
                    duration::format(crashloop_backoff)
                ),
                Some("make crashloop_backoff_max at least crashloop_backoff".into()),
            );
        }
        if name.is_empty() {
            return None;
        }
        Some(AppConfig {
            name,
            health_url,
            interval,
            timeout,
            expect_status,
            expect_body,
            max_retries,
            retry_interval,
            restart_cooldown,
            cpu_threshold,
            cpu_duration,
            startup_grace,
            restart_timeout,
            crashloop_restarts,
            crashloop_window,
            crashloop_backoff,
            crashloop_backoff_max,
        })
    }

    fn unknown_keys(&mut self, t: &Table, known: &[&str], section: &str) {
        for (key, _) in t.iter() {
            if !known.contains(&key) {
                let help = match suggest(key, known) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("the keys of {section} are: {}", known.join(", ")),
                };
                self.problem(
                    key_span(t, key),
                    format!("unknown key `{key}` in {section}"),
                    Some(help),
                );
            }
        }
    }

    fn value<'t>(&mut self, t: &'t Table, key: &str) -> Option<(&'t Value, Range<usize>)> {
        let item = t.get(key)?;
        let span = item.span().unwrap_or_else(|| key_span(t, key));
        match item.as_value() {
            Some(v) => Some((v, span)),
            None => {
                self.problem(span, format!("`{key}` must be a value, not a table"), None);
                None
            }
        }
    }

    fn string(&mut self, t: &Table, key: &str) -> Option<(String, Range<usize>)> {
        let (v, span) = self.value(t, key)?;
        match v.as_str() {
            Some(s) => Some((s.to_string(), span)),
            None => {
                self.problem(
                    span,
                    format!("`{key}` must be a string, not {}", v.type_name()),
                    Some(format!("put the value in double quotes: {key} = \"...\"")),
                );
                None
            }
        }
    }

    fn boolean(&mut self, t: &Table, key: &str) -> Option<bool> {
        let (v, span) = self.value(t, key)?;
        match v.as_bool() {
            Some(b) => Some(b),
            None => {
                self.problem(
                    span,
                    format!("`{key}` must be true or false, not {}", v.type_name()),
                    Some(format!("write {key} = true or {key} = false")),
                );
                None
            }
        }
    }

    fn integer(
        &mut self,
        t: &Table,
        key: &str,
        default: i64,
        range: std::ops::RangeInclusive<i64>,
    ) -> i64 {
        let Some((v, span)) = self.value(t, key) else {
            return default;
        };
        let help = format!(
            "set {key} to a whole number from {} to {} (default {default})",
            range.start(),
            range.end()
        );
        match v.as_integer() {
            Some(n) if range.contains(&n) => n,
            Some(n) => {
                self.problem(
                    span,
                    format!("{key} must be {}..={}, not {n}", range.start(), range.end()),
                    Some(help),
                );
                default
            }
            None => {
                self.problem(
                    span,
                    format!("`{key}` must be a whole number, not {}", v.type_name()),
                    Some(help),
                );
                default
            }
        }
    }

    fn number(
        &mut self,
        t: &Table,
        key: &str,
        default: f64,
        range: std::ops::RangeInclusive<f64>,
    ) -> f64 {
        let Some((v, span)) = self.value(t, key) else {
            return default;
        };
        let n = v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
        let help = format!(
            "set {key} to a number from {} to {} (% of one core; default {default})",
            range.start(),
            range.end()
        );
        match n {
            Some(n) if range.contains(&n) => n,
            Some(n) => {
                self.problem(
                    span,
                    format!("{key} must be {}..={}, not {n}", range.start(), range.end()),
                    Some(help),
                );
                default
            }
            None => {
                self.problem(
                    span,
                    format!("`{key}` must be a number, not {}", v.type_name()),
                    Some(help),
                );
                default
            }
        }
    }

    fn duration(
        &mut self,
        t: &Table,
        key: &str,
        default: Duration,
        range: std::ops::RangeInclusive<Duration>,
    ) -> Duration {
        let Some((v, span)) = self.value(t, key) else {
            return default;
        };
        let bounds = format!(
            "from {} to {}",
            duration::format(*range.start()),
            duration::format(*range.end())
        );
        let help = format!(
            "write a duration {bounds} with a unit, e.g. {key} = \"{}\" (the default)",
            duration::format(default)
        );
        let Some(text) = v.as_str() else {
            let message = match v.as_integer() {
                Some(n) => format!("`{key}` = {n} has no unit"),
                None => format!("`{key}` must be a duration string, not {}", v.type_name()),
            };
            self.problem(span, message, Some(help));
            return default;
        };
        match duration::parse(text) {
            Ok(d) if range.contains(&d) => d,
            Ok(_) => {
                self.problem(
                    span,
                    format!("{key} must be {bounds}, not {text}"),
                    Some(help),
                );
                default
            }
            Err(why) => {
                self.problem(span, format!("{key}: {why}"), Some(help));
                default
            }
        }
    }

    fn status_match(&mut self, t: &Table) -> StatusMatch {
        let Some((v, span)) = self.value(t, "expect_status") else {
            return StatusMatch::Success;
        };
        let help = "write one status or a list, e.g. expect_status = 200 or [200, 204]";
        let valid = |n: i64| (100..=599).contains(&n);
        let codes: Option<Vec<i64>> = match v {
            Value::Integer(i) => Some(vec![*i.value()]),
            Value::Array(a) => a.iter().map(Value::as_integer).collect(),
            _ => None,
        };
        match codes {
            Some(c) if !c.is_empty() && c.iter().all(|n| valid(*n)) => {
                StatusMatch::AnyOf(c.into_iter().map(|n| n as u16).collect())
            }
            _ => {
                self.problem(
                    span,
                    "expect_status must be HTTP statuses (100..=599)".into(),
                    Some(help.into()),
                );
                StatusMatch::Success
            }
        }
    }
}

/// Why a CloudWatch namespace would be refused, if it would.
fn namespace_problem(n: &str) -> Option<&'static str> {
    if n.trim().is_empty() {
        Some("is empty")
    } else if n.len() > 255 {
        Some("is longer than 255 characters")
    } else if n.starts_with("AWS/") {
        Some("starts with `AWS/`, which is reserved for AWS services")
    } else if !n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ".-_/#: ".contains(c))
    {
        Some("has characters CloudWatch refuses (allowed: A-Z a-z 0-9 . - _ / # : space)")
    } else {
        None
    }
}

fn key_span(t: &Table, key: &str) -> Range<usize> {
    t.key(key).and_then(|k| k.span()).unwrap_or(0..0)
}

fn value_span(t: &Table, key: &str) -> Range<usize> {
    t.get(key)
        .and_then(Item::span)
        .unwrap_or_else(|| key_span(t, key))
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The closest known word, if it is close enough to be a likely typo.
fn suggest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (levenshtein(word, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
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
        let url = a.health_url.as_ref().unwrap();
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
        let p = problems("[[apps]]\nname = \"a\"\nhealth_url = \"https://127.0.0.1/h\"\n");
        assert!(p[0].message.contains("https"), "{p:?}");
        let p = problems("[[apps]\nname = 1");
        assert!(p[0].message.starts_with("invalid TOML"), "{p:?}");
        assert_eq!(p[0].line, 1);
    }

    #[test]
    fn expect_status_forms() {
        let c = parse("[[apps]]\nname = \"a\"\nexpect_status = [200, 204]\n").unwrap();
        assert!(c.apps[0].expect_status.accepts(204));
        assert!(!c.apps[0].expect_status.accepts(201));
        let c = parse("[[apps]]\nname = \"a\"\n").unwrap();
        assert!(c.apps[0].expect_status.accepts(201));
        assert!(!c.apps[0].expect_status.accepts(500));
        let p = problems("[[apps]]\nname = \"a\"\nexpect_status = 700\n");
        assert_eq!(p[0].line, 3);
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
}
