//! `[[notify]]`: alert sinks beside SNS (a JSON webhook, or a Slack-compatible incoming
//! webhook), read key by key like the other sections. The URL is checked here: https only
//! (http only to a loopback host), no user name or password; `url_file` is read by
//! `Config::load_with_url_files`, so `validate`, `run` and a reload refuse a bad one too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{Item, Table, Value};

use super::read::{key_span, secs, Cx, Keys};
use super::Problem;
use crate::net::Url;
use crate::sys::privilege::AgentUser;

/// The body a sink sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyKind {
    /// A JSON document with the event's fields (see README).
    Webhook,
    /// `{"text": ...}`: Slack's incoming webhooks, Mattermost, Rocket.Chat, Discord's /slack.
    Slack,
}

impl NotifyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyKind::Webhook => "webhook",
            NotifyKind::Slack => "slack",
        }
    }
}

/// The events a sink can be told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NotifyEvent {
    GiveUp,
    Escalation,
    Restart,
    Recovered,
    Resurrect,
}

impl NotifyEvent {
    pub const ALL: [NotifyEvent; 5] = [
        NotifyEvent::GiveUp,
        NotifyEvent::Escalation,
        NotifyEvent::Restart,
        NotifyEvent::Recovered,
        NotifyEvent::Resurrect,
    ];

    /// The name in the config and the `event` field of a payload (the event log's `kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::GiveUp => "give_up",
            NotifyEvent::Escalation => "escalation",
            NotifyEvent::Restart => "restart",
            NotifyEvent::Recovered => "recovered",
            NotifyEvent::Resurrect => "resurrect",
        }
    }

    pub fn parse(s: &str) -> Option<NotifyEvent> {
        NotifyEvent::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

/// One `[[notify]]` sink.
#[derive(Debug, Clone, PartialEq)]
pub struct NotifyConfig {
    /// `type`: "webhook" or "slack".
    pub kind: NotifyKind,
    /// Shown in `status` and as the Prometheus `sink` label (default "<type>-<n>", n counting
    /// the [[notify]] sections from 1). Never the URL.
    pub name: String,
    /// `url`, or the one line of `url_file` once `Config::load_with_url_files` has read it. Its Debug form is
    /// redacted.
    pub url: Option<Url>,
    /// `url_file`: a file (mode 0600 or 0640) holding the URL, so the secret stays out of the
    /// config. Read at start and at every reload.
    pub url_file: Option<UrlFile>,
    /// Which events are sent (default: all five).
    pub events: Vec<NotifyEvent>,
    /// The last N lines (0..=200, default 0) of the app's PM2 error log, at most 4 KiB.
    pub attach_log_lines: u32,
    /// At most this many alerts per app per `rate_window` (default 5) ...
    pub rate_limit: u32,
    /// ... (default "5m"); the alerts held back are counted and told in the next one.
    pub rate_window: Duration,
    /// Longest wait between two delivery attempts while the endpoint fails (default "2m").
    pub retry_max_interval: Duration,
}

/// Where `url_file` was written, for the problem `Config::load_with_url_files` reports when it cannot be used.
#[derive(Debug, Clone, PartialEq)]
pub struct UrlFile {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
}

const TYPES: &str = "\"webhook\" or \"slack\"";

impl Cx<'_> {
    /// Every `[[notify]]` section.
    pub(super) fn notify_sinks(&mut self, root: &Table) -> Vec<NotifyConfig> {
        let mut out: Vec<NotifyConfig> = Vec::new();
        match root.get("notify") {
            None => {}
            Some(Item::ArrayOfTables(list)) => {
                for (i, table) in list.iter().enumerate() {
                    if let Some(n) = self.notify(table, i + 1) {
                        if out.iter().any(|o| o.name == n.name) {
                            self.problem(
                                key_span(table, "name"),
                                format!("two [[notify]] sections are named `{}`", n.name),
                                Some("give each [[notify]] its own `name`".into()),
                            );
                        }
                        out.push(n);
                    }
                }
            }
            Some(other) => self.problem(
                other.span().unwrap_or(0..0),
                "`notify` must be a list of tables".into(),
                Some("write each sink as its own [[notify]] section".into()),
            ),
        }
        out
    }

    fn notify(&mut self, t: &Table, n: usize) -> Option<NotifyConfig> {
        let mut t = Keys::new(t, "[[notify]]");
        let kind = self.notify_kind(&mut t);
        let name = self.notify_name(&mut t, kind, n);
        let url = self.notify_url(&mut t);
        let url_file = self.notify_url_file(&mut t);
        let events = self.notify_events(&mut t);
        let attach_log_lines = self.integer(&mut t, "attach_log_lines", 0, 0..=200) as u32;
        let rate_limit = self.integer(&mut t, "rate_limit", 5, 1..=1000) as u32;
        let rate_window = self.duration(&mut t, "rate_window", secs(300), secs(1)..=secs(86_400));
        let retry_max_interval = self.duration(
            &mut t,
            "retry_max_interval",
            secs(120),
            secs(1)..=secs(3600),
        );
        let whole = t.span().unwrap_or(0..0);
        self.finish(t);
        let kind = kind?;
        match (&url, &url_file) {
            (Some(_), Some(_)) | (None, None) => {
                self.problem(
                    whole,
                    "a [[notify]] section needs exactly one of `url` and `url_file`".into(),
                    Some("write url = \"https://...\", or url_file = \"/etc/pmguard/notify.url\" to keep the secret out of the config".into()),
                );
                return None;
            }
            _ => {}
        }
        Some(NotifyConfig {
            kind,
            name,
            url: url.flatten(),
            url_file,
            events,
            attach_log_lines,
            rate_limit,
            rate_window,
            retry_max_interval,
        })
    }

    fn notify_kind(&mut self, t: &mut Keys<'_>) -> Option<NotifyKind> {
        let Some((s, span)) = self.string(t, "type") else {
            if !t.contains_key("type") {
                let span = t.span().unwrap_or(0..0);
                self.problem(
                    span,
                    "a [[notify]] section has no `type`".into(),
                    Some(format!("add type = {TYPES}")),
                );
            }
            return None;
        };
        match s.as_str() {
            "webhook" => Some(NotifyKind::Webhook),
            "slack" => Some(NotifyKind::Slack),
            other => {
                self.problem(
                    span,
                    format!("unknown notify type `{other}`"),
                    Some(format!("write type = {TYPES} (slack also suits Mattermost and other Slack-compatible webhooks)")),
                );
                None
            }
        }
    }

    fn notify_name(&mut self, t: &mut Keys<'_>, kind: Option<NotifyKind>, n: usize) -> String {
        let default = format!("{}-{n}", kind.map_or("notify", NotifyKind::as_str));
        let Some((name, span)) = self.string(t, "name") else {
            return default;
        };
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ok {
            self.problem(
                span,
                format!("notify name `{name}` is not a sink name"),
                Some("use 1 to 64 of A-Z a-z 0-9 - _ ., e.g. name = \"ops-slack\"".into()),
            );
            return default;
        }
        name
    }

    /// `Some(None)`: the key is there but the URL cannot be used (the problem is reported).
    fn notify_url(&mut self, t: &mut Keys<'_>) -> Option<Option<Url>> {
        let (text, span) = self.string(t, "url")?;
        match check_url(&text) {
            Ok(u) => Some(Some(u)),
            Err((message, help)) => {
                self.problem(span, format!("url: {message}"), Some(help));
                Some(None)
            }
        }
    }

    fn notify_url_file(&mut self, t: &mut Keys<'_>) -> Option<UrlFile> {
        let (text, span) = self.string(t, "url_file")?;
        let path = PathBuf::from(&text);
        if !path.is_absolute() {
            self.problem(
                span,
                format!("url_file `{text}` is not an absolute path"),
                Some("write the full path, e.g. url_file = \"/etc/pmguard/slack.url\"".into()),
            );
            return None;
        }
        let (line, column) = self.place(span);
        Some(UrlFile { path, line, column })
    }

    fn notify_events(&mut self, t: &mut Keys<'_>) -> Vec<NotifyEvent> {
        let all = NotifyEvent::ALL.to_vec();
        let Some((v, span)) = self.value(t, "events") else {
            return all;
        };
        let names = NotifyEvent::ALL.map(NotifyEvent::as_str).join("\", \"");
        let help = format!("choose from events = [\"{names}\"]");
        let Some(list) = v.as_array() else {
            self.problem(
                span,
                "`events` must be a list of event names".into(),
                Some(help),
            );
            return all;
        };
        let mut out = Vec::new();
        for item in list.iter() {
            let span = item.span().unwrap_or_else(|| span.clone());
            match item.as_str().and_then(NotifyEvent::parse) {
                Some(e) if !out.contains(&e) => out.push(e),
                Some(_) => {}
                None => {
                    let shown = match item {
                        Value::String(s) => s.value().clone(),
                        other => format!("a {}", other.type_name()),
                    };
                    self.problem(
                        span,
                        format!("unknown notify event `{shown}`"),
                        Some(help.clone()),
                    );
                }
            }
        }
        if out.is_empty() && !list.is_empty() {
            return all;
        }
        out.sort();
        out
    }
}

/// Opens `url_file` with O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC; a symlink is refused, said plainly.
fn open_url_file(path: &Path) -> Result<std::fs::File, (String, String)> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path);
    opened.map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            let target = std::fs::read_link(path)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "its target".into());
            return (
                format!("is a symbolic link (to {target}); symlinks are refused, so the file checked is the file read"),
                format!("write the real file's path in url_file (url_file = \"{target}\")"),
            );
        }
        (
            e.to_string(),
            "create the file (0600, owned by the agent's user or root) with the webhook URL on its first line".into(),
        )
    })
}

/// A URL a sink may send to: https, or http to a loopback host; `(message, fix)` otherwise.
/// Messages never repeat the URL's path or query (they may hold a token).
pub fn check_url(text: &str) -> Result<Url, (String, String)> {
    let help = "write the webhook's https:// URL as your chat or alerting tool gives it";
    let url = Url::parse(text).map_err(|e| (e, help.to_string()))?;
    if !url.https && !url.is_loopback() {
        return Err((
            format!("{} is plain http to a host that is not loopback; alerts and the webhook's secret would cross the network in clear", url.redacted()),
            "use https:// (plain http is allowed only to 127.0.0.1, ::1 or localhost)".into(),
        ));
    }
    Ok(url)
}

/// Reads each sink's `url_file` into its `url`, judged for `agent` (the user who reads it at
/// every reload). Problems point at the `url_file` line.
pub(super) fn resolve_url_files(sinks: &mut [NotifyConfig], agent: &AgentUser) -> Vec<Problem> {
    let mut problems = Vec::new();
    for s in sinks.iter_mut() {
        let Some(f) = &s.url_file else {
            continue;
        };
        match read_url_file(&f.path, agent) {
            Ok(url) => s.url = Some(url),
            Err((message, help)) => problems.push(Problem {
                line: f.line,
                column: f.column,
                message: format!("url_file {}: {message}", f.path.display()),
                help: Some(help),
            }),
        }
    }
    problems
}

/// The file is opened without following a symlink and without blocking (a FIFO), and checked
/// on the opened descriptor: a regular file, owned by the agent's user or root, not readable by
/// others, and readable by the agent's user, so what is read is what was checked, and what
/// `validate` passes under sudo the agent can read too.
fn read_url_file(path: &Path, agent: &AgentUser) -> Result<Url, (String, String)> {
    use std::io::Read;
    let p = path.display();
    let name = &agent.name;
    let fix_mode = format!(
        "chmod 0600 {p} (or 0640 with the agent's group), owned by the agent's user {name} or root"
    );
    let file = open_url_file(path)?;
    let meta = file
        .metadata()
        .map_err(|e| (e.to_string(), fix_mode.clone()))?;
    if !meta.is_file() {
        return Err((
            "not a regular file".into(),
            format!("point url_file at a regular file; {fix_mode}"),
        ));
    }
    check_owner(path, &meta, agent, &fix_mode)?;
    let mut bytes = Vec::new();
    file.take(4096)
        .read_to_end(&mut bytes)
        .map_err(|e| (e.to_string(), fix_mode.clone()))?;
    let text = String::from_utf8_lossy(&bytes);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty());
    let Some(line) = line else {
        return Err((
            "the file is empty".into(),
            "write the webhook URL on the file's first line".into(),
        ));
    };
    check_url(line)
}

/// Owned by the agent's user or root, not readable by others, readable by the agent's user.
fn check_owner(
    path: &Path,
    meta: &std::fs::Metadata,
    agent: &AgentUser,
    fix_mode: &str,
) -> Result<(), (String, String)> {
    use std::os::unix::fs::MetadataExt;
    let (p, name) = (path.display(), &agent.name);
    let (owner, mode) = (meta.uid(), meta.mode() & 0o7777);
    let fix_owner = format!("chown {name} {p} && chmod 0600 {p}");
    if owner != agent.uid && owner != 0 {
        return Err((
            format!(
                "owned by {}, not by the agent's user {} or root: another user could change where alerts go",
                user_name(owner),
                agent.who
            ),
            fix_owner,
        ));
    }
    if mode & 0o037 != 0 {
        return Err((
            format!("mode {mode:04o} lets others read or change the secret URL"),
            fix_mode.to_string(),
        ));
    }
    // Judged for another user (validate under sudo): the open as root proves nothing.
    if agent.uid != crate::sys::privilege::euid() {
        let readable = if owner == agent.uid {
            mode & 0o400 != 0
        } else {
            mode & 0o040 != 0 && agent.gids.contains(&meta.gid())
        };
        if !readable {
            return Err((
                format!(
                    "owned by {} with mode {mode:04o} and group {}: the agent's user {} cannot read it",
                    user_name(owner),
                    meta.gid(),
                    agent.who
                ),
                format!("{fix_owner} (or chgrp to a group of {name} and chmod 0640)"),
            ));
        }
    }
    Ok(())
}

/// "uid 1001 (alice)", or "uid 1001" for a uid with no passwd entry.
fn user_name(uid: u32) -> String {
    match crate::sys::privilege::lookup(uid) {
        Ok(u) => format!("uid {uid} ({})", u.name),
        Err(_) => format!("uid {uid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};

    fn parse(notify: &str) -> Result<Config, ConfigError> {
        Config::parse(
            Path::new("/etc/pmguard/pmguard.toml"),
            &format!("[[apps]]\nname = \"web\"\n\n{notify}"),
        )
    }

    fn problems(notify: &str) -> Vec<Problem> {
        match parse(notify) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_every_event_no_log_five_per_five_minutes() {
        let c = parse(
            "[[notify]]\ntype = \"slack\"\nurl = \"https://hooks.slack.com/services/T/B/SECRET\"\n",
        )
        .unwrap();
        let n = &c.notify[0];
        assert_eq!(n.kind, NotifyKind::Slack);
        assert_eq!(n.name, "slack-1");
        assert_eq!(n.events, NotifyEvent::ALL.to_vec());
        assert_eq!(
            (n.attach_log_lines, n.rate_limit, n.rate_window),
            (0, 5, secs(300))
        );
        assert_eq!(n.url.as_ref().unwrap().host, "hooks.slack.com");
        assert!(
            !format!("{c:?}").contains("SECRET"),
            "Debug shows the secret"
        );
    }

    #[test]
    fn http_off_loopback_userinfo_bad_event_and_type_name_the_line_and_fix() {
        let p = problems(
            "[[notify]]\ntype = \"webhook\"\nurl = \"http://alerts.example.com/hook/SECRET\"\n",
        );
        assert_eq!(p[0].line, 6, "{p:?}");
        assert!(p[0].message.contains("plain http"), "{p:?}");
        assert!(!p[0].message.contains("SECRET"), "{p:?}");
        assert!(p[0].help.as_ref().unwrap().contains("use https://"));
        let p = problems("[[notify]]\ntype = \"webhook\"\nurl = \"https://u:pw@example.com/h\"\n");
        assert!(p[0].message.contains("user name or password"), "{p:?}");
        let p = problems("[[notify]]\ntype = \"webhook\"\nurl = \"https://example.com/h\"\nevents = [\"restart\", \"restrat\"]\n");
        assert_eq!(
            (p[0].line, p[0].message.as_str()),
            (7, "unknown notify event `restrat`")
        );
        assert!(p[0].help.as_ref().unwrap().contains("\"recovered\""));
        let p = problems("[[notify]]\ntype = \"teams\"\nurl = \"https://example.com/h\"\n");
        assert_eq!(
            (p[0].line, p[0].message.as_str()),
            (5, "unknown notify type `teams`")
        );
        let p = problems("[[notify]]\ntype = \"slack\"\n");
        assert!(p[0].message.contains("exactly one of `url` and `url_file`"));
        let p = problems(
            "[[notify]]\ntype = \"slack\"\nurl = \"https://x.example/h\"\nchannel = \"#ops\"\n",
        );
        assert_eq!(p[0].message, "unknown key `channel` in [[notify]]");
        assert!(parse("[[notify]]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/h\"\n").is_ok());
    }

    #[test]
    fn url_file_is_read_at_load_and_must_be_private() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("slack.url");
        std::fs::write(&file, "https://hooks.slack.com/services/T/B/SECRET\n").unwrap();
        let cfg = d.path().join("pmguard.toml");
        let text = format!(
            "[[apps]]\nname = \"web\"\n[[notify]]\ntype = \"slack\"\nurl_file = \"{}\"\n",
            file.display()
        );
        std::fs::write(&cfg, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(
            Config::load(&cfg).unwrap().notify[0].url,
            None,
            "status and check never read it"
        );
        let c = Config::load_with_url_files(&cfg).unwrap();
        assert_eq!(
            c.notify[0].url.as_ref().unwrap().target,
            "/services/T/B/SECRET"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Config::load_with_url_files(&cfg).unwrap_err().to_string();
        assert!(err.contains("pmguard.toml:5:12: url_file"), "{err}");
        assert!(
            err.contains("mode 0644") && err.contains("chmod 0600"),
            "{err}"
        );
        assert!(!err.contains("SECRET"), "{err}");
    }

    #[test]
    fn url_file_owned_by_another_user_or_a_symlink_is_refused_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("other.url");
        std::fs::write(&file, "https://evil.example/hook\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cfg = d.path().join("pmguard.toml");
        let text = format!(
            "[[apps]]\nname = \"web\"\n[[notify]]\ntype = \"slack\"\nurl_file = \"{}\"\n",
            file.display()
        );
        std::fs::write(&cfg, text).unwrap();
        let me = crate::sys::privilege::euid();
        // Another user (nobody) owns it: only root may hand a file to another user.
        if me == 0 {
            std::os::unix::fs::chown(&file, Some(65534), Some(65534)).unwrap();
            let err = Config::load_with_url_files(&cfg).unwrap_err().to_string();
            assert!(err.contains("owned by uid 65534 (nobody)"), "{err}");
            assert!(err.contains("not by the agent's user root (uid 0"), "{err}");
            assert!(
                err.contains(&format!("chown root {}", file.display())),
                "{err}"
            );
            std::os::unix::fs::chown(&file, Some(0), Some(0)).unwrap();
        }
        assert!(Config::load_with_url_files(&cfg).is_ok());
        // A symlink to a good file: refused, saying so, with the real path as the fix.
        let real = d.path().join("real.url");
        std::fs::rename(&file, &real).unwrap();
        std::os::unix::fs::symlink(&real, &file).unwrap();
        let err = Config::load_with_url_files(&cfg).unwrap_err().to_string();
        assert!(err.contains("is a symbolic link"), "{err}");
        assert!(err.contains("symlinks are refused"), "{err}");
        assert!(
            err.contains(&format!("url_file = \"{}\"", real.display())),
            "{err}"
        );
        // A FIFO is refused at once, never waited on.
        std::fs::remove_file(&file).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&file)
            .status()
            .unwrap();
        assert!(made.success());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = Config::load_with_url_files(&cfg).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
