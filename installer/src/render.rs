//! What `pmguard install` lays down, rendered from the config: every file's path, bytes, mode and
//! owner. Pure: no file is read here except the agent binary's bytes passed in by the caller.
//!
//! Text files come from askama templates in `templates/` (escaping off: none of them is HTML);
//! the IAM policy is JSON built from typed structs. Every text file carries `MARKER`.

use std::path::{Path, PathBuf};

use askama::Template;
use pmguard_agent::config::Config;

use crate::iam;
use crate::layout::Layout;
use crate::users::Account;

/// The "managed by pmguard" marker every rendered text file carries.
pub const MARKER: &str =
    "Managed by pmguard. Do not edit: changes are reverted by `pmguard install`.";

pub use crate::layout::{
    AGENT_PATH, CONFIG_PATH, CRON_PATH, LOGROTATE_PATH, MANIFEST_PATH, TEMPLATE_PATH, UNIT_NAME,
    UNIT_PATH,
};
/// Where the .deb puts the agent. Used in place, never written or removed by pmguard: the package
/// manager owns it.
pub const PACKAGED_AGENT_PATH: &str = "/usr/bin/pmguard-agent";
/// The instance role's policy (what the box calls); the admin policy sits beside it.
pub const IAM_PATH: &str = iam::AGENT_POLICY_PATH;
pub const IAM_ADMIN_PATH: &str = iam::ADMIN_POLICY_PATH;

/// One file to lay down.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredFile {
    /// Absolute path on the target system (the root is applied later).
    pub path: PathBuf,
    pub content: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub kind: FileKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Rendered by pmguard; drift is put back.
    Managed,
    /// The user's config: never overwritten silently once edited.
    UserConfig,
    /// The agent binary.
    Binary,
}

/// Inputs to rendering that are not in the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub account: Account,
    /// The validated config file's exact text.
    pub config_text: String,
    /// The agent's bytes, laid down at `AGENT_PATH`; `None`: run the packaged
    /// `PACKAGED_AGENT_PATH` in place.
    pub agent_binary: Option<Vec<u8>>,
    /// Who keeps PM2 running (`pm2unit::observe`).
    pub pm2: crate::pm2unit::Supervision,
    /// The single-user layout or one user's instance (`layout::for_install`).
    pub layout: Layout,
}

#[derive(Template)]
#[template(path = "pmguard-agent.service", escape = "none")]
struct UnitTemplate<'a> {
    marker: &'a str,
    user: &'a str,
    group: &'a str,
    pm2_unit: String,
    pm2_home: String,
    agent_path: &'a str,
    config_path: &'a str,
    watchdog_sec: &'a str,
    state_lines: Vec<String>,
    local_only: bool,
}

#[derive(Template)]
#[template(path = "pmguard-agent@.service", escape = "none")]
struct TemplateUnitTemplate<'a> {
    marker: &'a str,
    watchdog_sec: &'a str,
}

#[derive(Template)]
#[template(path = "pmguard-agent-instance.conf", escape = "none")]
struct DropInTemplate<'a> {
    marker: &'a str,
    user: &'a str,
    group: &'a str,
    agent_path: &'a str,
    config_path: String,
    pm2_unit: String,
    pm2_home: String,
    state_lines: Vec<String>,
    local_only: bool,
}

#[derive(Template)]
#[template(path = "pmguard-pm2.service", escape = "none")]
struct Pm2UnitTemplate<'a> {
    marker: &'a str,
    user: &'a str,
    group: &'a str,
    pm2_home: String,
    pm2_bin: String,
    path_env: &'a str,
}

#[derive(Template)]
#[template(path = "pmguard.cron", escape = "none")]
struct CronTemplate<'a> {
    marker: &'a str,
    schedule: &'a str,
    user: &'a str,
    tag: &'a str,
    agent_path: &'a str,
    config_path: &'a str,
}

#[derive(Template)]
#[template(path = "pmguard.logrotate", escape = "none")]
struct LogrotateTemplate<'a> {
    marker: &'a str,
    events_path: String,
    user: &'a str,
    group: &'a str,
}

/// Why rendering failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("template {name}: {source}")]
    Template {
        name: &'static str,
        source: askama::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

/// The PM2 home the agent will use: the config's, else `~user/.pm2`.
pub fn pm2_home(config: &Config, account: &Account) -> PathBuf {
    config
        .agent
        .pm2_home
        .clone()
        .unwrap_or_else(|| account.home.join(".pm2"))
}

/// Every value that reaches a unit, cron or logrotate line is plain: systemd expands `%`
/// specifiers and splits `BindPaths=` on `:`, cron treats `%` as a newline, logrotate's `su`
/// takes two words. Paths are absolute and normal; names are what useradd accepts. And the state
/// directory must be pmguard's own: `StateDirectory=` chowns it to the PM2 user.
pub fn check_values(config: &Config, a: &Account) -> Result<(), RenderError> {
    let bad = |what: &str, value: &str, why: &str| {
        Err(RenderError::Unsupported(format!(
            "{what} `{}`: {why}",
            value.escape_debug()
        )))
    };
    for (what, value) in [("user", a.user.as_str()), ("group", a.group.as_str())] {
        if !crate::layout::plain_name(value) {
            return bad(what, value, "a name for systemd, cron and logrotate may hold only letters, digits, `_`, `-` and `.` (at most 32, not starting with `-`)");
        }
    }
    let home = pm2_home(config, a);
    check_path("state_dir", &config.agent.state_dir)?;
    check_path("pm2_home", &home)?;
    if let Some(textfile) = &config.agent.prometheus_textfile {
        check_path("prometheus_textfile", textfile)?;
    }
    if let Ok(rel) = config.agent.state_dir.strip_prefix("/var/lib") {
        let first = rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        if !first.as_deref().is_some_and(|f| f.starts_with("pmguard")) {
            return bad(
                "state_dir",
                &config.agent.state_dir.to_string_lossy(),
                "under /var/lib the state directory must be pmguard's own (`/var/lib/pmguard`, or a name starting with `pmguard`): systemd's StateDirectory= hands the whole directory to the PM2 user",
            );
        }
    }
    Ok(())
}

/// A path that reaches a unit, cron or logrotate line: absolute, normal and plain.
fn check_path(what: &str, path: &Path) -> Result<(), RenderError> {
    let bad = |what: &str, value: &str, why: &str| {
        Err(RenderError::Unsupported(format!(
            "{what} `{}`: {why}",
            value.escape_debug()
        )))
    };
    let text = path.to_string_lossy();
    if !path.is_absolute() {
        return bad(what, &text, "must be an absolute path");
    }
    if path.components().any(|c| {
        !matches!(
            c,
            std::path::Component::RootDir | std::path::Component::Normal(_)
        )
    }) || text.contains("//")
        || (text.len() > 1 && text.ends_with('/'))
    {
        return bad(
            what,
            &text,
            "must be a normal path (no `.`, `..`, `//` or trailing `/`)",
        );
    }
    if !text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'.' | b'+' | b'@'))
    {
        return bad(what, &text, "may hold only letters, digits and `/ _ - . + @` (no spaces, quotes, `%`, `$`, `:` or `\\`): systemd and cron need it plain");
    }
    Ok(())
}

/// Renders every file `install` lays down, in a stable order.
pub fn render(config: &Config, s: &Settings) -> Result<Vec<DesiredFile>, RenderError> {
    let a = &s.account;
    check_values(config, a)?;
    let agent_path = match s.agent_binary {
        Some(_) => AGENT_PATH,
        None => PACKAGED_AGENT_PATH,
    };
    let binary = s.agent_binary.as_ref().map(|bytes| DesiredFile {
        path: PathBuf::from(AGENT_PATH),
        content: bytes.clone(),
        mode: 0o755,
        uid: 0,
        gid: 0,
        kind: FileKind::Binary,
    });
    let l = &s.layout;
    if let Layout::Instance(user) = l {
        crate::layout::instance_name(user).map_err(|e| RenderError::Unsupported(e.to_string()))?;
    }
    let mut files: Vec<DesiredFile> = binary.into_iter().collect();
    files.push(DesiredFile {
        path: l.config_path(),
        content: ensure_newline(s.config_text.clone()).into_bytes(),
        // Readable by the agent's group (the cron check runs as the PM2 user), not by others.
        mode: 0o640,
        uid: 0,
        gid: a.gid,
        kind: FileKind::UserConfig,
    });
    match l {
        Layout::Single => files.push(managed(UNIT_PATH, render_unit(config, s, agent_path)?)),
        Layout::Instance(_) => files.extend([
            managed(TEMPLATE_PATH, render_template_unit()?),
            managed(l.unit_path(), render_drop_in(config, s, agent_path)?),
        ]),
    }
    files.extend([
        managed(l.cron_path(), render_cron(s, agent_path)?),
        managed(l.logrotate_path(), render_logrotate(config, a)?),
    ]);
    if let Some(policy) = iam::agent_policy(config) {
        files.push(managed(l.iam_path(), iam::to_json(&policy)));
    }
    if let Some(policy) = iam::admin_policy(config) {
        files.push(managed(l.iam_admin_path(), iam::to_json(&policy)));
    }
    if let Some(body) = render_pm2_unit(config, s)? {
        files.push(managed(l.pm2_unit_path(), body));
    }
    Ok(files)
}

/// A rendered text file pmguard owns: root's, mode 0644.
fn managed(path: impl Into<PathBuf>, body: String) -> DesiredFile {
    DesiredFile {
        path: path.into(),
        content: ensure_newline(body).into_bytes(),
        mode: 0o644,
        uid: 0,
        gid: 0,
        kind: FileKind::Managed,
    }
}

/// The unit the agent starts after: `pm2 startup`'s, or the PM2 unit pmguard lays down.
fn pm2_unit_name(s: &Settings) -> String {
    match s.pm2 {
        crate::pm2unit::Supervision::Ours { .. } => s.layout.pm2_unit_name(),
        _ => s.pm2.unit(&s.account.user),
    }
}

/// The directories the sandbox must let the agent write: its state directory (systemd makes
/// one under /var/lib and hands it to the PM2 user), and node_exporter's textfile directory.
fn state_lines(config: &Config) -> Vec<String> {
    let state_dir = &config.agent.state_dir;
    let mut state_lines = match state_dir.strip_prefix("/var/lib") {
        Ok(rel) if !rel.as_os_str().is_empty() => vec![
            format!("StateDirectory={}", rel.display()),
            "StateDirectoryMode=0750".to_string(),
        ],
        _ => vec![format!("ReadWritePaths={}", state_dir.display())],
    };
    // ProtectSystem=strict: node_exporter's textfile directory must be opened for writing. The
    // `-`: a missing directory (node_exporter not installed yet, or purged) must not stop the
    // watchdog from starting; the agent then logs that it cannot write the file.
    if let Some(dir) = config
        .agent
        .prometheus_textfile
        .as_deref()
        .and_then(Path::parent)
    {
        state_lines.push(format!("ReadWritePaths=-{}", dir.display()));
    }
    state_lines
}

/// No `[aws]` and only loopback probes: the unit may deny every other address.
fn local_only(config: &Config) -> bool {
    config.aws.is_none()
        && config.apps.iter().all(|a| {
            a.probes
                .iter()
                .filter_map(|p| p.network_host())
                .all(is_loopback)
        })
}

/// `pmguard-agent.service` (the single-user layout).
fn render_unit(config: &Config, s: &Settings, agent_path: &str) -> Result<String, RenderError> {
    let a = &s.account;
    UnitTemplate {
        marker: MARKER,
        user: &a.user,
        group: &a.group,
        pm2_unit: pm2_unit_name(s),
        pm2_home: pm2_home(config, a).display().to_string(),
        agent_path,
        config_path: CONFIG_PATH,
        watchdog_sec: "30s",
        state_lines: state_lines(config),
        local_only: local_only(config),
    }
    .render()
    .map_err(|source| RenderError::Template {
        name: "pmguard-agent.service",
        source,
    })
}

/// `pmguard-agent@.service`: the same for every instance (nothing of any one install in it,
/// not even the agent's path: that is in each drop-in).
fn render_template_unit() -> Result<String, RenderError> {
    TemplateUnitTemplate {
        marker: MARKER,
        watchdog_sec: "30s",
    }
    .render()
    .map_err(|source| RenderError::Template {
        name: "pmguard-agent@.service",
        source,
    })
}

/// `pmguard-agent@<user>.service.d/pmguard.conf`: what one instance adds to the template.
fn render_drop_in(config: &Config, s: &Settings, agent_path: &str) -> Result<String, RenderError> {
    let a = &s.account;
    DropInTemplate {
        marker: MARKER,
        user: &a.user,
        group: &a.group,
        agent_path,
        config_path: s.layout.config_path().display().to_string(),
        pm2_unit: pm2_unit_name(s),
        pm2_home: pm2_home(config, a).display().to_string(),
        state_lines: state_lines(config),
        local_only: local_only(config),
    }
    .render()
    .map_err(|source| RenderError::Template {
        name: "pmguard-agent-instance.conf",
        source,
    })
}

/// The cron.d backup check.
fn render_cron(s: &Settings, agent_path: &str) -> Result<String, RenderError> {
    let config_path = s.layout.config_path().display().to_string();
    CronTemplate {
        marker: MARKER,
        schedule: "*/5 * * * *",
        user: &s.account.user,
        tag: &s.layout.cron_tag(),
        agent_path,
        config_path: &config_path,
    }
    .render()
    .map_err(|source| RenderError::Template {
        name: "pmguard.cron",
        source,
    })
}

/// The logrotate file for the agent's event file.
fn render_logrotate(config: &Config, a: &Account) -> Result<String, RenderError> {
    LogrotateTemplate {
        marker: MARKER,
        events_path: config
            .agent
            .state_dir
            .join("events.jsonl")
            .display()
            .to_string(),
        user: &a.user,
        group: &a.group,
    }
    .render()
    .map_err(|source| RenderError::Template {
        name: "pmguard.logrotate",
        source,
    })
}

/// `pmguard-pm2.service`, when pmguard puts PM2 itself under systemd.
fn render_pm2_unit(config: &Config, s: &Settings) -> Result<Option<String>, RenderError> {
    let crate::pm2unit::Supervision::Ours { pm2_bin, path_env } = &s.pm2 else {
        return Ok(None);
    };
    let a = &s.account;
    Pm2UnitTemplate {
        marker: MARKER,
        user: &a.user,
        group: &a.group,
        pm2_home: pm2_home(config, a).display().to_string(),
        pm2_bin: pm2_bin.display().to_string(),
        path_env,
    }
    .render()
    .map(Some)
    .map_err(|source| RenderError::Template {
        name: "pmguard-pm2.service",
        source,
    })
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn ensure_newline(mut s: String) -> String {
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// `path` under `root` (like DESTDIR).
pub fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    pub(crate) fn account() -> Account {
        Account {
            user: "ubuntu".into(),
            uid: 1000,
            group: "ubuntu".into(),
            gid: 1000,
            home: PathBuf::from("/home/ubuntu"),
        }
    }

    pub(crate) fn rendered(config: &str) -> Vec<DesiredFile> {
        let c = Config::parse(Path::new("/etc/pmguard/pmguard.toml"), config).unwrap();
        render(
            &c,
            &Settings {
                account: account(),
                config_text: config.to_string(),
                agent_binary: Some(b"\x7fELF not a real binary".to_vec()),
                pm2: crate::pm2unit::Supervision::Startup {
                    unit: "pm2-ubuntu.service".into(),
                },
                layout: Layout::Single,
            },
        )
        .unwrap()
    }

    pub(crate) const MINIMAL: &str =
        "[[apps]]\nname = \"codebox\"\nhealth_url = \"http://localhost:5000/api-health\"\n";
    pub(crate) const FULL: &str = "[agent]\ninterval = \"10s\"\nstate_dir = \"/var/lib/pmguard\"\npm2_home = \"/home/ubuntu/.pm2\"\n\n[[apps]]\nname = \"codebox\"\nhealth_url = \"http://localhost:5000/api-health\"\nexpect_body = \"healthy\"\nmax_retries = 3\n\n[aws]\nregion = \"us-east-1\"\nnamespace = \"PM2/CodeBox\"\nlog_group = \"/aws/ec2/pm2-health\"\nsns_topic = \"pmguard-alerts\"\nalarm_email = \"ops@example.com\"\n";
    pub(crate) const MULTI: &str = "[agent]\nstate_dir = \"/srv/pmguard/state\"\n\n[[apps]]\nname = \"api\"\nhealth_url = \"http://127.0.0.1:5000/health\"\n\n[[apps]]\nname = \"worker\"\n\n[[apps]]\nname = \"web\"\nhealth_url = \"http://10.0.0.5:8080/health\"\n";

    fn snapshot_all(label: &str, config: &str) {
        for f in rendered(config) {
            if f.kind == FileKind::Binary {
                continue;
            }
            let name = format!("{label}{}", f.path.display().to_string().replace('/', "_"));
            let text = String::from_utf8(f.content.clone()).unwrap();
            insta::assert_snapshot!(
                name,
                format!("mode {:04o} owner {}:{}\n{text}", f.mode, f.uid, f.gid)
            );
        }
    }

    pub(crate) fn account_of(user: &str, uid: u32) -> Account {
        Account {
            user: user.into(),
            uid,
            group: user.into(),
            gid: uid,
            home: PathBuf::from(format!("/home/{user}")),
        }
    }

    /// `user`'s instance (`pmguard-agent@<user>.service`) rendered from `config`.
    pub(crate) fn rendered_instance(config: &str, user: &str, uid: u32) -> Vec<DesiredFile> {
        rendered_for(config, user, uid, Layout::instance(user).unwrap())
    }

    /// `config` rendered for `user` in `layout`.
    pub(crate) fn rendered_for(
        config: &str,
        user: &str,
        uid: u32,
        layout: Layout,
    ) -> Vec<DesiredFile> {
        let c = Config::parse(Path::new("/etc/pmguard/pmguard.toml"), config).unwrap();
        render(
            &c,
            &Settings {
                account: account_of(user, uid),
                config_text: config.to_string(),
                agent_binary: Some(b"\x7fELF not a real binary".to_vec()),
                pm2: crate::pm2unit::Supervision::Startup {
                    unit: format!("pm2-{user}.service"),
                },
                layout,
            },
        )
        .unwrap()
    }

    pub(crate) const ALICE: &str = "[agent]\nstate_dir = \"/var/lib/pmguard-alice\"\n\n[[apps]]\nname = \"web\"\nhealth_url = \"http://127.0.0.1:5001/health\"\n";
    pub(crate) const BOB: &str = "[agent]\nstate_dir = \"/var/lib/pmguard-bob\"\n\n[[apps]]\nname = \"api\"\nhealth_url = \"http://127.0.0.1:5002/health\"\n\n[aws]\nregion = \"us-east-1\"\n";

    #[test]
    fn snapshots_instance() {
        for f in rendered_instance(ALICE, "alice", 1001) {
            if f.kind == FileKind::Binary {
                continue;
            }
            let name = format!("instance{}", f.path.display().to_string().replace('/', "_"));
            let text = String::from_utf8(f.content.clone()).unwrap();
            insta::assert_snapshot!(
                name,
                format!("mode {:04o} owner {}:{}\n{text}", f.mode, f.uid, f.gid)
            );
        }
    }

    #[test]
    fn two_instances_share_the_template_byte_for_byte_and_nothing_else() {
        let alice = rendered_instance(ALICE, "alice", 1001);
        let bob = rendered_instance(BOB, "bob", 1002);
        for a in &alice {
            match bob.iter().find(|b| b.path == a.path) {
                Some(b) => {
                    assert!(
                        crate::layout::Layout::is_shared(&a.path),
                        "{}",
                        a.path.display()
                    );
                    assert_eq!(a.content, b.content, "{}", a.path.display());
                }
                None => assert!(!crate::layout::Layout::is_shared(&a.path)),
            }
        }
        let text = |files: &[DesiredFile], p: &str| {
            let f = files.iter().find(|f| f.path == Path::new(p)).unwrap();
            String::from_utf8(f.content.clone()).unwrap()
        };
        let drop_in = text(
            &bob,
            "/etc/systemd/system/pmguard-agent@bob.service.d/pmguard.conf",
        );
        assert!(
            drop_in.contains("\nStateDirectory=pmguard-bob\n"),
            "{drop_in}"
        );
        assert!(
            drop_in.contains("\nBindPaths=/home/bob/.pm2\n"),
            "{drop_in}"
        );
        assert!(
            !drop_in.contains("IPAddressDeny"),
            "bob's agent reaches AWS"
        );
        assert!(text(
            &alice,
            "/etc/systemd/system/pmguard-agent@alice.service.d/pmguard.conf"
        )
        .contains("IPAddressDeny=any"));
        assert!(text(&bob, "/etc/cron.d/pmguard-bob").contains(
            " bob systemd-cat -t pmguard-check-bob /usr/local/bin/pmguard-agent check --once --config /etc/pmguard/users/bob/pmguard.toml\n"
        ));
        assert!(text(&bob, "/etc/logrotate.d/pmguard-bob")
            .contains("/var/lib/pmguard-bob/events.jsonl {"));
        assert!(bob
            .iter()
            .any(|f| f.path == Path::new("/etc/pmguard/users/bob/iam-agent-policy.json")));
    }

    #[test]
    fn an_instance_whose_pm2_is_not_under_systemd_gets_its_own_pm2_unit() {
        let c = Config::parse(Path::new("/x.toml"), ALICE).unwrap();
        let files = render(
            &c,
            &Settings {
                account: account_of("alice", 1001),
                config_text: ALICE.to_string(),
                agent_binary: None,
                pm2: crate::pm2unit::Supervision::Ours {
                    pm2_bin: "/usr/local/bin/pm2".into(),
                    path_env: "/usr/local/bin:/usr/bin:/bin".into(),
                },
                layout: Layout::instance("alice").unwrap(),
            },
        )
        .unwrap();
        let text = |p: &str| {
            let f = files.iter().find(|f| f.path == Path::new(p)).unwrap();
            String::from_utf8(f.content.clone()).unwrap()
        };
        let pm2 = text("/etc/systemd/system/pmguard-pm2-alice.service");
        assert!(pm2.contains("\nUser=alice\n"), "{pm2}");
        assert!(pm2.contains("PM2_HOME=/home/alice/.pm2"), "{pm2}");
        assert!(
            text("/etc/systemd/system/pmguard-agent@alice.service.d/pmguard.conf")
                .contains("\nAfter=pmguard-pm2-alice.service\n")
        );
        assert!(
            text("/etc/systemd/system/pmguard-agent@alice.service.d/pmguard.conf").contains(
                "\nExecStart=/usr/bin/pmguard-agent run --config /etc/pmguard/users/alice/pmguard.toml\n"
            )
        );
        assert!(!text(TEMPLATE_PATH).contains("ExecStart="));
        assert!(files
            .iter()
            .all(|f| f.path != Path::new(crate::pm2unit::PM2_UNIT_PATH)));
    }

    #[test]
    fn the_template_is_hardened_exactly_like_the_single_user_unit() {
        let hardening = |t: &str| -> Vec<String> {
            let from = t.find("# Hardening.").unwrap();
            t[from..]
                .lines()
                .filter(|l| {
                    !l.starts_with("IPAddress")
                        && !l.starts_with("BindPaths=")
                        && !l.starts_with('#')
                })
                .map(str::to_string)
                .collect()
        };
        let single = rendered(MINIMAL);
        let instance = rendered_instance(ALICE, "alice", 1001);
        let text = |files: &[DesiredFile], p: &str| {
            let f = files.iter().find(|f| f.path == Path::new(p)).unwrap();
            String::from_utf8(f.content.clone()).unwrap()
        };
        assert_eq!(
            hardening(&text(&single, UNIT_PATH)),
            hardening(&text(&instance, TEMPLATE_PATH))
        );
    }

    #[test]
    fn no_agent_unit_removes_the_pm2_users_ipc() {
        // RemoveIPC= deletes every POSIX/SysV IPC object of the unit's User= when it stops: the
        // PM2 user's apps' /dev/shm files when PM2 is not itself a unit. PrivateIPC= isolates
        // the agent without that.
        let text = |f: &DesiredFile| String::from_utf8(f.content.clone()).unwrap();
        let single = rendered(MINIMAL);
        let instance = rendered_instance(ALICE, "alice", 1001);
        for f in single.iter().chain(&instance) {
            if f.kind != FileKind::Managed || !f.path.starts_with("/etc/systemd") {
                continue;
            }
            assert!(!text(f).contains("RemoveIPC"), "{}", f.path.display());
        }
        for (files, p) in [(&single, UNIT_PATH), (&instance, TEMPLATE_PATH)] {
            let f = files.iter().find(|f| f.path == Path::new(p)).unwrap();
            assert!(text(f).contains("\nPrivateIPC=yes\n"), "{p}");
        }
    }

    #[test]
    fn snapshots_minimal() {
        snapshot_all("minimal", MINIMAL);
    }

    #[test]
    fn snapshots_full() {
        snapshot_all("full", FULL);
    }

    #[test]
    fn snapshots_multi_app() {
        snapshot_all("multi", MULTI);
    }

    #[test]
    fn pm2_not_under_systemd_gets_its_own_unit() {
        let c = Config::parse(Path::new("/etc/pmguard/pmguard.toml"), MINIMAL).unwrap();
        let files = render(
            &c,
            &Settings {
                account: account(),
                config_text: MINIMAL.to_string(),
                agent_binary: Some(vec![]),
                pm2: crate::pm2unit::Supervision::Ours {
                    pm2_bin: "/usr/local/bin/pm2".into(),
                    path_env: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                },
                layout: Layout::Single,
            },
        )
        .unwrap();
        let text = |p: &str| {
            String::from_utf8(
                files
                    .iter()
                    .find(|f| f.path == Path::new(p))
                    .unwrap()
                    .content
                    .clone(),
            )
            .unwrap()
        };
        let pm2 = text(crate::pm2unit::PM2_UNIT_PATH);
        insta::assert_snapshot!("pmguard_pm2_unit", pm2);
        assert!(text(UNIT_PATH).contains("After=network-online.target pmguard-pm2.service"));
    }

    #[test]
    fn the_prometheus_textfile_directory_is_writable_in_the_sandbox() {
        let config = format!("[agent]\nprometheus_textfile = \"/var/lib/prometheus/node-exporter/pmguard.prom\"\n\n{MINIMAL}");
        let unit = rendered(&config)
            .into_iter()
            .find(|f| f.path.ends_with("pmguard-agent.service"))
            .unwrap();
        let text = String::from_utf8(unit.content).unwrap();
        insta::assert_snapshot!("prometheus_textfile_unit", text);
        assert!(text.contains("\nStateDirectory=pmguard\n"), "{text}");
        assert!(
            // `-`: a missing directory must not stop the unit from starting.
            text.contains("\nReadWritePaths=-/var/lib/prometheus/node-exporter\n"),
            "{text}"
        );
    }

    #[test]
    fn every_text_file_is_marked_and_ends_with_a_newline() {
        for f in rendered(FULL) {
            if f.kind == FileKind::Managed {
                let t = String::from_utf8(f.content).unwrap();
                assert!(
                    t.contains(MARKER) || f.path.extension().is_some_and(|e| e == "json"),
                    "{}",
                    f.path.display()
                );
                assert!(t.ends_with('\n'));
            }
        }
    }

    #[test]
    fn loopback_only_without_aws_denies_other_addresses() {
        let unit = |c: &str| {
            let f = rendered(c)
                .into_iter()
                .find(|f| f.path == Path::new(UNIT_PATH))
                .unwrap();
            String::from_utf8(f.content).unwrap()
        };
        assert!(unit(MINIMAL).contains("IPAddressDeny=any"));
        assert!(
            !unit(FULL).contains("IPAddressDeny=any"),
            "AWS must stay reachable"
        );
        assert!(
            !unit(MULTI).contains("IPAddressDeny=any"),
            "10.0.0.5 is probed"
        );
    }

    #[test]
    fn a_packaged_agent_is_run_in_place_and_never_laid_down() {
        let c = Config::parse(Path::new("/etc/pmguard/pmguard.toml"), MINIMAL).unwrap();
        let settings = Settings {
            account: account(),
            config_text: MINIMAL.to_string(),
            agent_binary: None,
            pm2: crate::pm2unit::Supervision::Startup {
                unit: "pm2-ubuntu.service".into(),
            },
            layout: Layout::Single,
        };
        let files = render(&c, &settings).unwrap();
        assert!(files.iter().all(|f| f.kind != FileKind::Binary));
        assert!(files
            .iter()
            .all(|f| f.path != Path::new(PACKAGED_AGENT_PATH)));
        let text = |p: &str| {
            let f = files.iter().find(|f| f.path == Path::new(p)).unwrap();
            String::from_utf8(f.content.clone()).unwrap()
        };
        assert!(text(UNIT_PATH).contains("ExecStart=/usr/bin/pmguard-agent run"));
        assert!(text(CRON_PATH).contains(" /usr/bin/pmguard-agent check --once"));
    }

    #[test]
    fn values_unfit_for_templates_are_refused() {
        let refused = |agent: &str, group: &str| {
            let c = Config::parse(
                Path::new("/x.toml"),
                &format!("[agent]\n{agent}\n[[apps]]\nname = \"a\"\n"),
            )
            .unwrap();
            let mut a = account();
            a.group = group.to_string();
            check_values(&c, &a).err().map(|e| e.to_string())
        };
        for (agent, group, why) in [
            ("state_dir = \"/var/lib/pm guard\"", "ubuntu", "no spaces"),
            ("pm2_home = \"/home/u/.pm2:/etc\"", "ubuntu", "`:`"),
            ("pm2_home = \"/home/%u/.pm2\"", "ubuntu", "`%`"),
            (
                "pm2_home = \"/home/u/../root/.pm2\"",
                "ubuntu",
                "normal path",
            ),
            (
                "state_dir = \"/var/lib/postgresql\"",
                "ubuntu",
                "pmguard's own",
            ),
            ("", "ops team", "letters, digits"),
            ("", "a%b", "letters, digits"),
            ("", "$x", "letters, digits"),
            ("", "-rf", "letters, digits"),
        ] {
            let err = refused(agent, group);
            assert!(
                err.as_deref().is_some_and(|e| e.contains(why)),
                "{agent} / {group}: {err:?}"
            );
        }
        for (agent, group) in [
            ("state_dir = \"/var/lib/pmguard\"", "ubuntu"),
            ("state_dir = \"/var/lib/pmguard-web/state\"", "www-data"),
            (
                "state_dir = \"/srv/pmguard\"\npm2_home = \"/opt/app/.pm2\"",
                "ec2-user",
            ),
        ] {
            assert_eq!(refused(agent, group), None, "{agent} / {group}");
        }
    }
}
