//! The sections of the config file, read key by key: `[agent]`, `[aws]`, `[[apps]]`. Each key's
//! default, range and fix are written here, once (see `read` for how unknown keys are found).

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{Item, Table};

use crate::aws::names;

use super::duration;
use super::read::{key_span, ms, secs, suggest, value_span, Cx, Keys};
use super::{AgentConfig, AppConfig, AwsConfig, Config, SECTIONS};

impl Cx<'_> {
    pub(super) fn config(&mut self, path: &Path, root: &Table) -> Option<Config> {
        self.unknown_sections(root);
        let agent = match root.get("agent") {
            None => self.agent(&Table::new()),
            Some(Item::Table(t)) => self.agent(t),
            Some(other) => {
                self.problem(
                    other.span().unwrap_or(0..0),
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
                    other.span().unwrap_or(0..0),
                    "`aws` must be a table".into(),
                    Some("write it as a section: [aws]".into()),
                );
                None
            }
        };
        let apps = self.apps(root, &agent);
        let notify = self.notify_sinks(root);
        Some(Config {
            path: path.to_path_buf(),
            agent,
            apps,
            aws,
            notify,
        })
    }

    fn unknown_sections(&mut self, root: &Table) {
        for (key, _) in root.iter() {
            if !SECTIONS.contains(&key) {
                let span = key_span(root, key);
                let help = suggest(key, SECTIONS).map_or_else(
                    || "the sections are [agent], [aws], [[apps]] and [[notify]]".to_string(),
                    |s| format!("did you mean `{s}`?"),
                );
                self.problem(span, format!("unknown section `{key}`"), Some(help));
            }
        }
    }

    /// Every `[[apps]]` entry; at least one, each name once.
    fn apps(&mut self, root: &Table, agent: &AgentConfig) -> Vec<AppConfig> {
        let mut apps: Vec<AppConfig> = Vec::new();
        match root.get("apps") {
            None => self.problem(
                0..0,
                "no apps to watch".into(),
                Some("add at least one [[apps]] section with `name = \"<pm2 app name>\"`".into()),
            ),
            Some(Item::ArrayOfTables(list)) => {
                for table in list.iter() {
                    let Some(app) = self.app(table, agent) else {
                        continue;
                    };
                    if apps.iter().any(|a| a.name == app.name) {
                        self.problem(
                            value_span(table, "name"),
                            format!("app `{}` is listed twice", app.name),
                            Some("keep one [[apps]] section per PM2 app name".into()),
                        );
                    } else {
                        apps.push(app);
                    }
                }
            }
            Some(other) => self.problem(
                other.span().unwrap_or(0..0),
                "`apps` must be a list of tables".into(),
                Some("write each app as its own [[apps]] section".into()),
            ),
        }
        apps
    }

    fn aws(&mut self, t: &Table) -> AwsConfig {
        let mut t = Keys::new(t, "[aws]");
        let fleet = self.aws_fleet(&mut t);
        let auto_scaling_group = self.aws_auto_scaling_group(&mut t, &fleet);
        let region = self.aws_region(&mut t);
        let namespace = self.aws_namespace(&mut t);
        let log_group = self.aws_log_group(&mut t, &fleet);
        let log_retention_days = self.aws_log_retention_days(&mut t);
        let sns_topic = self.aws_sns_topic(&mut t, &fleet);
        let alarm_email = self.aws_alarm_email(&mut t);
        let flush_interval =
            self.duration(&mut t, "flush_interval", secs(60), secs(1)..=secs(3600));
        let high_resolution = self.boolean(&mut t, "high_resolution").unwrap_or(false);
        let (instance_id, instance_id_written) = self.aws_instance_id(&mut t);
        let alarm_down_minutes = self.integer(&mut t, "alarm_down_minutes", 10, 1..=1440) as u32;
        let alarm_failures = self.integer(&mut t, "alarm_failures", 3, 0..=100_000) as u32;
        let alarm_restarts = self.integer(&mut t, "alarm_restarts", 2, 0..=10_000) as u32;
        self.finish(t);
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
            instance_id_written,
            alarm_down_minutes,
            alarm_failures,
            alarm_restarts,
            fleet,
            auto_scaling_group,
        }
    }

    fn aws_fleet(&mut self, t: &mut Keys<'_>) -> Option<String> {
        self.string(t, "fleet").map(|(f, span)| {
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
        })
    }

    fn aws_auto_scaling_group(
        &mut self,
        t: &mut Keys<'_>,
        fleet: &Option<String>,
    ) -> Option<String> {
        self.string(t, "auto_scaling_group").map(|(g, span)| {
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
        })
    }

    fn aws_region(&mut self, t: &mut Keys<'_>) -> Option<String> {
        self.string(t, "region").map(|(r, span)| {
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
        })
    }

    fn aws_namespace(&mut self, t: &mut Keys<'_>) -> String {
        self.string(t, "namespace")
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
            .unwrap_or_else(|| names::DEFAULT_NAMESPACE.to_string())
    }

    fn aws_log_group(&mut self, t: &mut Keys<'_>, fleet: &Option<String>) -> String {
        self
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
            })
    }

    fn aws_log_retention_days(&mut self, t: &mut Keys<'_>) -> u32 {
        match self.value(t, "log_retention_days") {
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
        }
    }

    fn aws_sns_topic(&mut self, t: &mut Keys<'_>, fleet: &Option<String>) -> Option<String> {
        self.string(t, "sns_topic").map(|(n, span)| {
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
        .or_else(|| fleet.as_ref().map(|f| format!("pmguard-{f}-alerts")))
    }

    fn aws_alarm_email(&mut self, t: &mut Keys<'_>) -> Option<String> {
        self.string(t, "alarm_email").map(|(e, span)| {
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
        })
    }

    /// `instance_id`, as AWS will see it (see `names::instance_name`), and as written when that
    /// differs. Only a name no encoding can make acceptable is a problem.
    fn aws_instance_id(&mut self, t: &mut Keys<'_>) -> (Option<String>, Option<String>) {
        let Some((written, span)) = self.string(t, "instance_id") else {
            return (None, None);
        };
        let name = names::instance_name(&written).into_owned();
        if name.len() > 255 || name.trim().is_empty() {
            self.problem(
                span,
                "instance_id must be 1 to 255 characters, not only spaces (a character CloudWatch refuses counts as its %XX encoding)".into(),
                Some(
                    "remove the key to use the EC2 instance id (or the host name off EC2)"
                        .into(),
                ),
            );
        }
        let encoded = (name != written).then_some(written);
        (Some(name), encoded)
    }

    fn agent(&mut self, t: &Table) -> AgentConfig {
        let mut t = Keys::new(t, "[agent]");
        let interval = self.duration(&mut t, "interval", secs(10), ms(100)..=secs(3600));
        let state_dir = self.agent_state_dir(&mut t);
        let pm2_home = self.agent_pm2_home(&mut t);
        let pm2_bin = self
            .string(&mut t, "pm2_bin")
            .map_or_else(|| "pm2".to_string(), |(s, _)| s);
        let resurrect = self.boolean(&mut t, "resurrect").unwrap_or(true);
        let events_max_bytes =
            self.integer(&mut t, "events_max_bytes", 16 << 20, 65_536..=(1 << 34)) as u64;
        let log_passing_checks = self.boolean(&mut t, "log_passing_checks").unwrap_or(false);
        let prometheus_textfile = self.agent_prometheus_textfile(&mut t);
        self.finish(t);
        AgentConfig {
            interval,
            state_dir,
            pm2_home,
            pm2_bin,
            resurrect,
            events_max_bytes,
            log_passing_checks,
            prometheus_textfile,
        }
    }

    fn agent_prometheus_textfile(&mut self, t: &mut Keys<'_>) -> Option<PathBuf> {
        self.string(t, "prometheus_textfile").map(|(s, span)| {
            let p = PathBuf::from(&s);
            if !p.is_absolute() || !s.ends_with(".prom") {
                self.problem(
                    span,
                    format!("prometheus_textfile `{s}` is not an absolute path ending in .prom"),
                    Some("node_exporter reads *.prom files in its --collector.textfile.directory, e.g. prometheus_textfile = \"/var/lib/prometheus/node-exporter/pmguard.prom\"".into()),
                );
            }
            p
        })
    }

    fn agent_state_dir(&mut self, t: &mut Keys<'_>) -> PathBuf {
        self.string(t, "state_dir")
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
            .unwrap_or_else(|| PathBuf::from("/var/lib/pmguard"))
    }

    fn agent_pm2_home(&mut self, t: &mut Keys<'_>) -> Option<PathBuf> {
        self.string(t, "pm2_home").map(|(s, span)| {
            let p = PathBuf::from(&s);
            if !p.is_absolute() {
                self.problem(
                    span,
                    format!("pm2_home `{s}` is not an absolute path"),
                    Some("write a full path, e.g. pm2_home = \"/home/ubuntu/.pm2\"".into()),
                );
            }
            p
        })
    }

    fn app(&mut self, t: &Table, agent: &AgentConfig) -> Option<AppConfig> {
        let mut t = Keys::new(t, "[[apps]]");
        let name = self.app_name(&mut t);
        let interval = self.duration(&mut t, "interval", agent.interval, ms(100)..=secs(3600));
        let timeout = self.duration(&mut t, "timeout", secs(5), ms(10)..=secs(300));
        let probes = self.app_probes(&mut t, timeout);
        let max_retries = self.integer(&mut t, "max_retries", 3, 1..=100) as u32;
        let retry_interval =
            self.duration(&mut t, "retry_interval", secs(10), ms(100)..=secs(3600));
        let restart_cooldown =
            self.duration(&mut t, "restart_cooldown", secs(60), secs(0)..=secs(86_400));
        let cpu_threshold = self.number(&mut t, "cpu_threshold", 90.0, 1.0..=6400.0);
        let cpu_duration = self.duration(&mut t, "cpu_duration", secs(60), ms(100)..=secs(86_400));
        let startup_grace = self.duration(&mut t, "startup_grace", secs(30), secs(0)..=secs(3600));
        let restart_timeout =
            self.duration(&mut t, "restart_timeout", secs(10), secs(1)..=secs(600));
        let (crashloop_restarts, crashloop_window, crashloop_backoff, crashloop_backoff_max) =
            self.app_crashloop(&mut t);
        let tree = self.tree_rules(&mut t);
        self.finish(t);
        if name.is_empty() {
            return None;
        }
        Some(AppConfig {
            name,
            probes,
            interval,
            timeout,
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
            tree,
        })
    }

    /// The crash-loop keys: restarts within the window, then a pause that doubles up to the max.
    fn app_crashloop(&mut self, t: &mut Keys<'_>) -> (u32, Duration, Duration, Duration) {
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
        self.backoff_order(t, crashloop_backoff, crashloop_backoff_max);
        (
            crashloop_restarts,
            crashloop_window,
            crashloop_backoff,
            crashloop_backoff_max,
        )
    }

    fn app_name(&mut self, t: &mut Keys<'_>) -> String {
        match self.string(t, "name") {
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
        }
    }

    /// crashloop_backoff_max must not be shorter than crashloop_backoff.
    fn backoff_order(&mut self, t: &Keys<'_>, backoff: Duration, max: Duration) {
        if max < backoff {
            self.problem(
                value_span(t, "crashloop_backoff_max"),
                format!(
                    "crashloop_backoff_max ({}) is shorter than crashloop_backoff ({})",
                    duration::format(max),
                    duration::format(backoff)
                ),
                Some("make crashloop_backoff_max at least crashloop_backoff".into()),
            );
        }
    }
}

/// Why a CloudWatch namespace would be refused, if it would.
pub(super) fn namespace_problem(n: &str) -> Option<&'static str> {
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
