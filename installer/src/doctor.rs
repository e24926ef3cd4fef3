//! `pmguard doctor`: every part of a pmguard install checked, each with ok / warn / fail, one
//! line, and for warn/fail the exact fix. Checks only read: doctor never changes anything.
//!
//! Local checks are plain functions over what they read (under the root); the AWS checks reuse
//! provision-aws's observe and plan, so "drift" means exactly what provision-aws would change.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pmguard_agent::config::Config;
use pmguard_agent::pm2::{Client, Pm2Paths, Status};
use pmguard_agent::probe::Prober;
use pmguard_agent::report::state::StateDir;
use serde::Serialize;

use crate::layout::Layout;
use crate::manifest::Manifest;
use crate::render::{self, under, DesiredFile, Settings};
use crate::users;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub check: String,
    pub status: Level,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// The agent's unit the check is about, on a box with one agent per user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

fn ok(check: &str, detail: impl Into<String>) -> Check {
    Check {
        check: check.into(),
        status: Level::Ok,
        detail: detail.into(),
        fix: None,
        unit: None,
    }
}
fn warn(check: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        check: check.into(),
        status: Level::Warn,
        detail: detail.into(),
        fix: Some(fix.into()),
        unit: None,
    }
}
fn fail(check: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        check: check.into(),
        status: Level::Fail,
        detail: detail.into(),
        fix: Some(fix.into()),
        unit: None,
    }
}

/// What doctor was asked to look at.
pub struct Target<'a> {
    pub root: &'a Path,
    pub config_path: &'a Path,
    /// Whether the host's systemd may be asked (false under --root).
    pub live: bool,
    pub user: Option<String>,
    /// Which install: the single-user layout or one user's instance.
    pub layout: Layout,
}

/// Runs every local check. AWS checks are added by `aws_checks`.
pub fn local_checks(t: &Target<'_>) -> (Vec<Check>, Option<Config>) {
    let config = match Config::load(t.config_path) {
        Ok(c) => c,
        Err(e) => {
            let check = fail(
                "config",
                e.to_string(),
                format!(
                    "fix the lines above, then `pmguard-agent validate --config {}`",
                    t.config_path.display()
                ),
            );
            return (vec![check], None);
        }
    };
    let mut out = vec![ok(
        "config",
        format!(
            "{} is valid ({} app(s))",
            t.config_path.display(),
            config.apps.len()
        ),
    )];
    let manifest = Manifest::read(&under(t.root, &t.layout.manifest_path()))
        .ok()
        .flatten();
    let agent_path = installed_agent(t, manifest.as_ref());
    out.push(agent_binary(t, agent_path, manifest.as_ref()));
    let account = user_of(t);
    out.extend(account.as_ref().map(|a| private_group(t, a)));
    let desired = account
        .as_ref()
        .and_then(|a| desired_files(t, &config, a, agent_path));
    for (name, path) in rendered_paths(&t.layout) {
        out.push(rendered_file(t, name, &path, desired.as_deref()));
    }
    out.push(cron_readable(t));
    out.extend(installed_modes(t, manifest.as_ref()));
    out.extend(systemd_checks(t));
    out.extend(crate::legacy::find(t.root).iter().map(|l| {
        warn(
            "other monitor",
            format!("{l} also restarts PM2 apps: two monitors fight over one app"),
            "stop it with `pmguard install --replace-legacy` (uninstall puts it back)",
        )
    }));
    out.push(heartbeat(&config, &t.layout.unit_name()));
    let paths = pm2_paths(&config, account.as_ref());
    out.extend(pm2_checks(
        &config,
        &paths,
        t.live,
        &t.layout.pm2_unit_name(),
    ));
    (out, Some(config))
}

/// The files doctor compares with what install renders, by check name.
fn rendered_paths(layout: &Layout) -> Vec<(&'static str, String)> {
    let mut v = match layout {
        Layout::Single => vec![("unit file", render::UNIT_PATH.to_string())],
        Layout::Instance(_) => vec![
            ("unit file", render::TEMPLATE_PATH.to_string()),
            ("unit drop-in", layout.unit_path().display().to_string()),
        ],
    };
    v.push((
        "cron backup check",
        layout.cron_path().display().to_string(),
    ));
    v.push((
        "logrotate file",
        layout.logrotate_path().display().to_string(),
    ));
    v
}

/// What install would lay down now for this config and account (`None` when it cannot tell).
fn desired_files(
    t: &Target<'_>,
    config: &Config,
    account: &users::Account,
    agent_path: &str,
) -> Option<Vec<DesiredFile>> {
    let config_text = std::fs::read_to_string(t.config_path).ok()?;
    let agent_binary = (agent_path == render::AGENT_PATH)
        .then(|| std::fs::read(under(t.root, Path::new(render::AGENT_PATH))).unwrap_or_default());
    render::render(
        config,
        &Settings {
            account: account.clone(),
            config_text,
            agent_binary,
            pm2: crate::pm2unit::observe(t.root, account, config),
            layout: t.layout.clone(),
        },
    )
    .ok()
}

/// The agent the install runs: its own copy at `AGENT_PATH`, or the package's binary in place
/// when the install laid no copy (the manifest lists none) and the package's binary is there.
fn installed_agent(t: &Target<'_>, manifest: Option<&Manifest>) -> &'static str {
    let copied = manifest.is_some_and(|m| m.files.contains_key(Path::new(render::AGENT_PATH)));
    let packaged = under(t.root, Path::new(render::PACKAGED_AGENT_PATH)).exists();
    if !copied && packaged {
        render::PACKAGED_AGENT_PATH
    } else {
        render::AGENT_PATH
    }
}

/// The installed agent, judged by its bytes: never executed (doctor runs as root and the file
/// under `--root` may be anyone's). A copy must have the sha256 install recorded in the
/// manifest; either way it must be the agent that ships beside this `pmguard`, when there is one.
fn agent_binary(t: &Target<'_>, agent_path: &str, manifest: Option<&Manifest>) -> Check {
    let path = under(t.root, Path::new(agent_path));
    let found = match crate::manifest::sha256_file(&path) {
        Ok(h) => h,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return fail(
                "agent binary",
                format!("{} is missing", path.display()),
                "run `pmguard install --config <file>`",
            )
        }
        Err(e) => {
            return fail(
                "agent binary",
                format!("{}: {e}", path.display()),
                "reinstall with `pmguard install`",
            )
        }
    };
    let short = &found[..12];
    if let Some(recorded) = manifest.and_then(|m| m.files.get(Path::new(agent_path))) {
        if *recorded != found {
            return fail(
                "agent binary",
                format!(
                    "{agent_path} is not the file install laid down (sha256 {short}..., recorded {}...)",
                    &recorded[..recorded.len().min(12)]
                ),
                "run `pmguard install --config <file>` to put the agent back",
            );
        }
    }
    let shipped = std::env::current_exe()
        .ok()
        .and_then(|me| crate::manifest::sha256_file(&me.with_file_name("pmguard-agent")).ok());
    match shipped {
        Some(h) if h != found => warn(
            "agent binary",
            format!(
                "{agent_path} (sha256 {short}...) is not the agent that ships with this pmguard {}",
                env!("CARGO_PKG_VERSION")
            ),
            "run `pmguard install` from this release to put the matching agent in place",
        ),
        _ => ok(
            "agent binary",
            format!("{agent_path} (sha256 {short}..., as installed)"),
        ),
    }
}

/// The agent's group is the PM2 user's alone (install checks the same): nobody else reads
/// its config, state or events.
/// A second user's instance requires it (fail); the single-user install is warned.
fn private_group(t: &Target<'_>, a: &users::Account) -> Check {
    let judge = match t.layout {
        Layout::Instance(_) => fail,
        Layout::Single => warn,
    };
    match users::private_group(t.root, a) {
        Ok(()) => ok(
            "private group",
            format!("group `{}` is {}'s alone", a.group, a.user),
        ),
        Err(e) => judge(
            "private group",
            e.to_string(),
            format!(
                "sudo groupadd {0} && sudo usermod -g {0} {0}, then re-run pmguard install",
                a.user
            ),
        ),
    }
}

/// The PM2 user: `--user`, else the installed unit's `User=`.
fn user_of(t: &Target<'_>) -> Option<users::Account> {
    let name = t.user.clone().or_else(|| match &t.layout {
        Layout::Single => crate::layout::single_user(t.root),
        Layout::Instance(u) => Some(u.clone()),
    })?;
    users::lookup(t.root, &name).ok()
}

fn rendered_file(t: &Target<'_>, name: &str, path: &str, desired: Option<&[DesiredFile]>) -> Check {
    let real = under(t.root, Path::new(path));
    let Ok(found) = std::fs::read(&real) else {
        return fail(
            name,
            format!("{path} is missing"),
            "run `pmguard install --config <file>`",
        );
    };
    let Some(want) = desired.and_then(|d| d.iter().find(|f| f.path == Path::new(path))) else {
        return warn(
            name,
            format!("{path} exists; cannot tell its user (pass --user)"),
            "pass --user USER",
        );
    };
    if found == want.content {
        ok(name, format!("{path} is as pmguard renders it"))
    } else {
        let diff = crate::plan::diff(&found, &want.content);
        fail(
            name,
            format!("{path} differs from what pmguard renders (edited by hand?):\n{diff}"),
            "run `pmguard install --config <file>` to put it back (`--dry-run` shows the diff)",
        )
    }
}

fn cron_readable(t: &Target<'_>) -> Check {
    let own_config = format!("--config {}", t.layout.config_path().display());
    let dir = under(t.root, Path::new("/etc/cron.d"));
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return fail(
            "cron file name",
            format!("{} is missing", dir.display()),
            "install cron (`apt-get install cron`)",
        );
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        // This agent's check: with several agents, each cron file names its own config.
        let ours = std::fs::read_to_string(e.path()).is_ok_and(|text| {
            text.contains("pmguard-agent check --once") && text.contains(&own_config)
        });
        if !ours {
            continue;
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return fail("cron file name", format!("/etc/cron.d/{name} holds the pmguard check, but cron ignores files whose names have characters other than A-Z a-z 0-9 _ -"), format!("rename it: mv /etc/cron.d/{name} {} (or re-run `pmguard install`)", t.layout.cron_path().display()));
        }
        let Ok(m) = e.metadata() else { continue };
        if m.mode() & 0o022 != 0 || (t.live && m.uid() != 0) {
            return fail("cron file name", format!("/etc/cron.d/{name} is mode {:04o} owner {}: cron ignores group/other-writable or non-root files", m.mode() & 0o7777, m.uid()), format!("chown root:root /etc/cron.d/{name} && chmod 0644 /etc/cron.d/{name}"));
        }
        return ok(
            "cron file name",
            format!("/etc/cron.d/{name} will be read by cron"),
        );
    }
    fail(
        "cron file name",
        format!("no file in /etc/cron.d runs `pmguard-agent check --once {own_config}`"),
        "run `pmguard install --config <file>`",
    )
}

fn installed_modes(t: &Target<'_>, manifest: Option<&Manifest>) -> Vec<Check> {
    let Some(m) = manifest else {
        return vec![warn(
            "installed files",
            "no install manifest: pmguard was not installed with `pmguard install`",
            "run `pmguard install --config <file>`",
        )];
    };
    let mut problems: Vec<String> = m.files.keys().flat_map(|p| file_problems(t, p)).collect();
    problems.extend(config_dir_problem(t));
    problems.sort();
    problems.dedup();
    if problems.is_empty() {
        vec![ok(
            "installed files",
            format!("{} files with safe modes and owners", m.files.len()),
        )]
    } else {
        vec![fail("installed files", problems.join("; "), "run `pmguard install --config <file>` (it resets modes and owners), and `chmod o-w` any directory named")]
    }
}

/// What is wrong with one installed file: missing, world-writable, not root's, or under a
/// world-writable directory.
fn file_problems(t: &Target<'_>, path: &Path) -> Vec<String> {
    let real = under(t.root, path);
    let Ok(meta) = std::fs::symlink_metadata(&real) else {
        return vec![format!("{} is missing", path.display())];
    };
    let mut problems = Vec::new();
    if meta.mode() & 0o002 != 0 {
        problems.push(format!("{} is world-writable", path.display()));
    }
    if t.live && meta.uid() != 0 {
        problems.push(format!(
            "{} is owned by uid {}, not root",
            path.display(),
            meta.uid()
        ));
    }
    // Every directory on the way must not be world-writable (unless sticky, like /tmp).
    let mut dir = real.parent();
    while let Some(d) = dir {
        if let Ok(dm) = std::fs::metadata(d) {
            if dm.mode() & 0o002 != 0 && dm.mode() & 0o1000 == 0 {
                problems.push(format!(
                    "{} (on the way to {}) is world-writable",
                    d.display(),
                    path.display()
                ));
            }
        }
        if d == t.root {
            break;
        }
        dir = d.parent();
    }
    problems
}

/// The config directory must let the PM2 user reach its config (a root umask of 077 at
/// install time makes it 0700).
fn config_dir_problem(t: &Target<'_>) -> Option<String> {
    let config_path = t.layout.config_path();
    let config_dir = config_path.parent().unwrap_or(Path::new("/"));
    let dm = std::fs::metadata(under(t.root, config_dir)).ok()?;
    (dm.mode() & 0o7777 != crate::plan::DIR_MODE).then(|| {
        format!(
            "{} has mode {:04o}, not {:04o}: the PM2 user cannot read its config",
            config_dir.display(),
            dm.mode() & 0o7777,
            crate::plan::DIR_MODE
        )
    })
}

fn systemd_checks(t: &Target<'_>) -> Vec<Check> {
    let unit = t.layout.unit_name();
    let unit = unit.as_str();
    if !t.live {
        return vec![warn(
            "systemd unit",
            "staging root: systemd not asked",
            "run doctor without --root on the host",
        )];
    }
    if !Path::new("/run/systemd/system").is_dir() {
        return vec![warn(
            "systemd unit",
            "systemd is not running here (PID 1 is not systemd): the agent is not supervised",
            "run the agent under systemd, or start `pmguard-agent run` by other means",
        )];
    }
    let out = Command::new("systemctl")
        .args(["show", unit, "-p", "LoadState,UnitFileState,ActiveState,SubState,Result,NRestarts,WatchdogUSec,ExecMainStatus"])
        .output();
    let Ok(out) = out else {
        return vec![fail(
            "systemd unit",
            "cannot run systemctl",
            "check that systemd is installed",
        )];
    };
    unit_checks(
        &UnitProps(String::from_utf8_lossy(&out.stdout).into_owned()),
        unit,
    )
}

/// `systemctl show -p ...` output: `Key=value` lines.
struct UnitProps(String);

impl UnitProps {
    fn get(&self, k: &str) -> String {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .to_string()
    }
}

/// The agent's unit as systemd reports it: loaded, enabled, active, not crash-looping, with
/// its watchdog armed.
fn unit_checks(p: &UnitProps, unit: &str) -> Vec<Check> {
    if p.get("LoadState") != "loaded" {
        return vec![fail(
            "systemd unit",
            format!("{} is {}", unit, p.get("LoadState")),
            "run `pmguard install` and `systemctl daemon-reload`",
        )];
    }
    let mut v = Vec::new();
    v.push(if p.get("UnitFileState") == "enabled" {
        ok("unit enabled", "enabled at boot")
    } else {
        fail(
            "unit enabled",
            format!("unit file state: {}", p.get("UnitFileState")),
            format!("systemctl enable {}", unit),
        )
    });
    v.push(unit_active(p, unit));
    let restarts: u32 = p.get("NRestarts").parse().unwrap_or(0);
    if restarts >= 3 {
        v.push(warn(
            "agent crash loop",
            format!("systemd restarted the agent {restarts} times"),
            format!("journalctl -u {} to see why it exits", unit),
        ));
    }
    let wd = p.get("WatchdogUSec");
    v.push(if !wd.is_empty() && wd != "0" && wd != "infinity" {
        ok("watchdog", format!("armed ({wd})"))
    } else {
        warn(
            "watchdog",
            "WatchdogSec is not set: a wedged agent would not be restarted",
            "re-run `pmguard install` (the unit sets WatchdogSec)",
        )
    });
    v
}

fn unit_active(p: &UnitProps, unit: &str) -> Check {
    if p.get("ActiveState") == "active" {
        return ok(
            "unit active",
            format!(
                "active ({}), restarts {}",
                p.get("SubState"),
                p.get("NRestarts")
            ),
        );
    }
    fail(
        "unit active",
        format!(
            "{} ({}), last result {}, exit status {}",
            p.get("ActiveState"),
            p.get("SubState"),
            p.get("Result"),
            p.get("ExecMainStatus")
        ),
        format!(
            "journalctl -u {} -n 50; then systemctl restart {}",
            unit, unit
        ),
    )
}

/// Runtime state (heartbeat, PM2) is always the live system's: `--root` maps installed files only.
fn heartbeat(config: &Config, unit: &str) -> Check {
    let dir = config.agent.state_dir.clone();
    let state = StateDir::new(&dir);
    match state.read_status() {
        Ok(Some(s)) if s.is_fresh() => ok("agent alive", format!("heartbeat {} ms old (pid {})", s.age_ms().unwrap_or(0), s.pid)),
        Ok(Some(s)) => fail(
            "agent alive",
            match s.age_ms() {
                Some(a) => format!("last heartbeat {:.0} s ago (more than 3 check periods plus 2 s): the agent is dead or wedged", a as f64 / 1000.0),
                None => "the last heartbeat is from before the last boot".into(),
            },
            format!("systemctl restart {} (and journalctl -u {} for why it stopped)", unit, unit),
        ),
        Ok(None) => fail("agent alive", format!("no heartbeat in {}", dir.display()), format!("start the agent: systemctl enable --now {}", unit)),
        Err(e) => fail("agent alive", e.to_string(), "check the state directory's permissions"),
    }
}

/// Runtime state is the live system's, `--root` or not.
fn pm2_paths(config: &Config, account: Option<&users::Account>) -> Option<Pm2Paths> {
    if let Some(h) = &config.agent.pm2_home {
        return Some(Pm2Paths::from_home(h));
    }
    if let Some(a) = account {
        return Some(Pm2Paths::from_home(&a.home.join(".pm2")));
    }
    Pm2Paths::resolve(None).ok()
}

/// Is the PM2 daemon itself kept running by systemd (its process in a PM2 unit's cgroup)?
/// Otherwise a killed daemon stays down until the cron check, and nothing starts it at boot.
fn pm2_supervised(paths: &Pm2Paths, pm2_unit: &str) -> Check {
    use pmguard_agent::pm2::liveness::{daemon_process, DaemonProcess};
    let DaemonProcess::Alive(pid) = daemon_process(paths, Path::new("/proc")) else {
        return warn(
            "pm2 supervised",
            format!("no live daemon named by {}", paths.home.join("pm2.pid").display()),
            format!("start PM2 through systemd: `systemctl start {pm2_unit}` (or `pm2-<user>` after `pm2 startup`)"),
        );
    };
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    // e.g. `0::/system.slice/pm2-ubuntu.service`
    let unit = cgroup
        .lines()
        .flat_map(|l| l.split('/'))
        .map(str::trim)
        .find(|part| part.ends_with(".service") && part.contains("pm2"))
        .map(str::to_string);
    match unit {
        Some(u) => ok("pm2 supervised", format!("PM2 daemon (pid {pid}) runs under {u}")),
        None => warn(
            "pm2 supervised",
            format!("the PM2 daemon (pid {pid}) runs outside systemd: if it is killed, nothing starts it again before the cron check, and nothing starts it at boot"),
            format!("hand it to systemd (the apps restart once): `sudo -u <user> pm2 save && sudo -u <user> pm2 kill && sudo systemctl start {pm2_unit}` (or `pm2 startup`)"),
        ),
    }
}

/// Does `dump.pm2` (what `pm2 resurrect` and a boot bring back) name the apps PM2 runs now?
/// Only the names are read: the file holds every app's environment, secrets included.
fn pm2_dump(paths: &Pm2Paths, snap: &pmguard_agent::pm2::Snapshot) -> Check {
    #[derive(serde::Deserialize)]
    struct Entry {
        name: String,
    }
    let path = paths.home.join("dump.pm2");
    let dumped: Vec<Entry> = match pmguard_agent::sys::files::read_capped(&path, 64 << 20) {
        Ok(Some(b)) => match serde_json::from_slice(&b) {
            Ok(v) => v,
            Err(e) => {
                return warn(
                    "pm2 dump",
                    format!("{} cannot be read as PM2's dump: {e}", path.display()),
                    "`pm2 save` as the PM2 user",
                )
            }
        },
        Ok(None) => {
            return warn(
                "pm2 dump",
                format!(
                    "no {}: after a reboot or `pm2 resurrect`, PM2 starts no app",
                    path.display()
                ),
                "`pm2 save` as the PM2 user",
            )
        }
        Err(e) => {
            return warn(
                "pm2 dump",
                format!("{}: {e}", path.display()),
                "check its permissions",
            )
        }
    };
    let saved: BTreeSet<&str> = dumped.iter().map(|e| e.name.as_str()).collect();
    let running: BTreeSet<&str> = snap.processes().iter().map(|e| e.name.as_str()).collect();
    compare_dump(&saved, &running)
}

/// The apps the dump names against those PM2 runs.
fn compare_dump(saved: &BTreeSet<&str>, running: &BTreeSet<&str>) -> Check {
    if saved == running {
        return ok(
            "pm2 dump",
            format!("dump.pm2 names the {} running app(s)", running.len()),
        );
    }
    let back: Vec<&str> = saved.difference(running).copied().collect();
    let lost: Vec<&str> = running.difference(saved).copied().collect();
    let mut detail = Vec::new();
    if !back.is_empty() {
        detail.push(format!(
            "would come back though not running now: {}",
            back.join(", ")
        ));
    }
    if !lost.is_empty() {
        detail.push(format!("would not come back: {}", lost.join(", ")));
    }
    warn(
        "pm2 dump",
        format!(
            "dump.pm2 differs from what PM2 runs; after a reboot or `pm2 resurrect` {}",
            detail.join("; ")
        ),
        "`pm2 save` as the PM2 user once the running apps are the ones you want",
    )
}

fn pm2_checks(config: &Config, paths: &Option<Pm2Paths>, live: bool, pm2_unit: &str) -> Vec<Check> {
    let Some(paths) = paths else {
        return vec![fail(
            "pm2 daemon",
            "cannot tell where PM2 lives",
            "set [agent] pm2_home or pass --user",
        )];
    };
    let client = Client::new(paths.clone());
    let snap = match client.list(Duration::from_secs(3)) {
        Ok(s) => s,
        Err(e) => {
            let mut v = vec![fail(
                "pm2 daemon",
                format!("no PM2 daemon answers at {}: {e}", paths.rpc.display()),
                format!("start PM2 as the app user (`pm2 resurrect` or `systemctl start pm2-<user>`), or point [agent] pm2_home at the directory that holds rpc.sock (PM2_HOME={} now)", paths.home.display()),
            )];
            for app in &config.apps {
                v.push(fail(
                    &format!("app {}", app.name),
                    "unknown: PM2 is not reachable",
                    "fix the PM2 daemon first",
                ));
            }
            return v;
        }
    };
    let version = client
        .version(Duration::from_secs(2))
        .unwrap_or_else(|_| "?".into());
    let mut v = vec![ok(
        "pm2 daemon",
        format!("PM2 {version} answers at {}", paths.rpc.display()),
    )];
    if live {
        v.push(pm2_supervised(paths, pm2_unit));
    }
    v.push(pm2_dump(paths, &snap));
    for app in &config.apps {
        v.extend(app_checks(app, &snap));
    }
    v
}

/// One app in PM2 now: its status, whether it is stuck, and its health probe.
fn app_checks(
    app: &pmguard_agent::config::AppConfig,
    snap: &pmguard_agent::pm2::Snapshot,
) -> Vec<Check> {
    let name = format!("app {}", app.name);
    let entries = snap.by_name(&app.name);
    if entries.is_empty() {
        return vec![fail(&name, "PM2 does not know this app", format!("start it under PM2 (`pm2 start <script> --name {}`) and `pm2 save`, or fix the name in the config", app.name))];
    }
    let mut v = Vec::new();
    let bad: Vec<String> = entries
        .iter()
        .filter(|e| e.status != Status::Online)
        .map(|e| format!("pm_id {} is {}", e.pm_id, e.status.as_str()))
        .collect();
    if !bad.is_empty() {
        let fix = if entries.iter().any(|e| e.status == Status::Errored) {
            format!(
                "PM2 gave up on it: `pm2 logs {}` to see why, then `pm2 restart {}`",
                app.name, app.name
            )
        } else {
            format!("pm2 start {}", app.name)
        };
        v.push(fail(&name, bad.join(", "), fix));
    } else {
        let restarts: u64 = entries.iter().map(|e| e.unstable_restarts).sum();
        if restarts > 0 {
            v.push(warn(
                &name,
                format!("online, but {restarts} unstable restart(s) recently"),
                format!("`pm2 logs {}`: it exits soon after starting", app.name),
            ));
        } else {
            let pids: Vec<String> = entries.iter().map(|e| e.pid.to_string()).collect();
            v.push(ok(&name, format!("online (pid {})", pids.join(", "))));
        }
    }
    v.push(stuck_now(
        app,
        &entries.iter().map(|e| e.pid).collect::<Vec<_>>(),
    ));
    v.extend(health_now(app));
    v
}

/// The app's health URL probed once, now (`None` without one).
fn health_now(app: &pmguard_agent::config::AppConfig) -> Vec<Check> {
    let name = format!("health {}", app.name);
    let one = |spec: &pmguard_agent::config::target::ProbeSpec| {
        let r = Prober::new(vec![spec.clone()]).probe();
        let ms = r.latency.as_millis();
        if r.outcome.passed() {
            ok(
                &name,
                format!("{} answered {} in {ms} ms", r.target, r.outcome.reason()),
            )
        } else {
            fail(
                &name,
                format!("{}: {} after {ms} ms", r.target, r.outcome.reason()),
                format!(
                    "`pm2 logs {}`; the agent restarts it after {} failed checks",
                    app.name, app.max_retries
                ),
            )
        }
    };
    app.probes.iter().map(one).collect()
}

/// CPU over a short window and the scheduler state of each pid, now.
fn stuck_now(app: &pmguard_agent::config::AppConfig, pids: &[u32]) -> Check {
    use pmguard_agent::procfs::{cpu_percent, ticks_per_sec, ProcWatch};
    let name = format!("cpu {}", app.name);
    let watches: Vec<ProcWatch> = pids
        .iter()
        .filter(|p| **p > 0)
        .filter_map(|p| ProcWatch::open(Path::new("/proc"), *p).ok())
        .collect();
    let first: Vec<_> = watches.iter().map(|w| w.sample().ok()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut notes = Vec::new();
    let mut worst = 0.0f64;
    for (w, a) in watches.iter().zip(first) {
        let (Some(a), Ok(b)) = (a, w.sample()) else {
            continue;
        };
        let pct = cpu_percent(a.cpu_ticks, b.cpu_ticks, 300, ticks_per_sec());
        worst = worst.max(pct);
        if matches!(b.state, 'T' | 'D') {
            notes.push(format!(
                "pid {} is {}",
                w.pid,
                if b.state == 'T' {
                    "stopped (state T)"
                } else {
                    "in uninterruptible sleep (D)"
                }
            ));
        }
    }
    if !notes.is_empty() {
        fail(&name, notes.join(", "), format!("the agent restarts it; by hand: `pm2 restart {}` (a stopped process: kill -CONT <pid>)", app.name))
    } else if worst >= app.cpu_threshold {
        warn(
            &name,
            format!("CPU {worst:.0}% now (threshold {}%)", app.cpu_threshold),
            format!(
                "if it stays there for {} the agent restarts it",
                pmguard_agent::config::duration::format(app.cpu_duration)
            ),
        )
    } else {
        ok(&name, format!("CPU {worst:.0}% now"))
    }
}

/// The AWS checks (only with an `[aws]` section).
pub async fn aws_checks(config: &Config) -> Vec<Check> {
    use crate::aws::provision;
    let Some(aws) = config.aws.as_ref() else {
        return vec![ok("aws", "no [aws] section: fully local")];
    };
    let mut v = Vec::new();
    let source = credentials_source();
    let clients = provision::clients(config).await;
    v.push(ok(
        "aws credentials",
        format!("from {source}; region {}", clients.region),
    ));
    let instance = match &aws.instance_id {
        Some(i) => i.clone(),
        None => pmguard_agent::aws::sink::this_instance(),
    };
    let observed = match provision::observe(&clients, config, &instance).await {
        Ok(o) => o,
        // A fleet box's role holds the agent policy only, as it should: the fleet's shared
        // resources are the admin side's to check, not a failure of this box.
        Err(e) if e.access_denied() && aws.fleet.is_some() => {
            v.push(warn(
                "aws resources",
                format!(
                    "this box may not read the fleet's alarms, topic and dashboard ({}): expected on a fleet box, whose role holds the agent policy only",
                    e.detail
                ),
                "check the fleet from the admin side: `pmguard provision-aws --config <file> --dry-run` (or `pmguard doctor`) with admin credentials",
            ));
            return v;
        }
        Err(e) => {
            v.push(fail("aws access", e.detail.clone(), e.fix.clone()));
            return v;
        }
    };
    v.push(ok(
        "aws access",
        "DescribeAlarms, DescribeLogGroups, ListTopics allowed",
    ));
    v.push(resources_check(
        config,
        &instance,
        &clients.region,
        &observed,
    ));
    v.extend(subscription_check(config, &observed));
    v.push(metrics_arriving(&clients, config, &instance).await);
    v
}

/// Where the AWS SDK takes its credentials from, for the user.
fn credentials_source() -> &'static str {
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_some() {
        "environment variables"
    } else if std::env::var_os("AWS_PROFILE").is_some() {
        "AWS_PROFILE"
    } else {
        "the default chain (profile or instance profile via IMDSv2)"
    }
}

/// AWS matches the config: provision-aws would plan nothing.
fn resources_check(
    config: &Config,
    instance: &str,
    region: &str,
    observed: &crate::aws::provision::AwsObserved,
) -> Check {
    use crate::aws::provision;
    match provision::plan(config, instance, region, observed) {
        Ok(steps) if steps.is_empty() => ok(
            "aws resources",
            "topic, log group, alarms and dashboard match the config",
        ),
        Ok(steps) => fail(
            "aws resources",
            format!(
                "{} difference(s) from the config:\n{}",
                steps.len(),
                provision::display(&steps, observed, config).trim_end()
            ),
            "run `pmguard provision-aws --config <file>` (`--dry-run` first to see it)",
        ),
        Err(e) => fail("aws resources", e.to_string(), "fix the config"),
    }
}

/// The email subscription is confirmed (pure: from what was observed).
pub fn subscription_check(
    config: &Config,
    obs: &crate::aws::provision::AwsObserved,
) -> Option<Check> {
    let email = config.aws.as_ref()?.alarm_email.as_ref()?;
    Some(match obs.subscriptions.get(email) {
        None => fail("alarm email", format!("{email} is not subscribed to the topic"), "run `pmguard provision-aws --config <file>`"),
        Some(s) if s.eq_ignore_ascii_case("PendingConfirmation") || s.eq_ignore_ascii_case("pending confirmation") => warn(
            "alarm email",
            format!("{email} has not confirmed the subscription: alarm emails are not delivered"),
            "click the link in the email from AWS Notifications (search the inbox and spam for \"AWS Notification - Subscription Confirmation\")",
        ),
        Some(_) => ok("alarm email", format!("{email} is subscribed")),
    })
}

async fn metrics_arriving(
    c: &crate::aws::provision::Clients,
    config: &Config,
    instance: &str,
) -> Check {
    use aws_sdk_cloudwatch::types::{Dimension, Statistic};
    let Some(aws) = config.aws.as_ref() else {
        return ok("metrics", "no [aws]");
    };
    let now = std::time::SystemTime::now();
    let start = now - Duration::from_secs(3600);
    let out =
        c.cw.get_metric_statistics()
            .namespace(&aws.namespace)
            .metric_name(pmguard_agent::aws::names::AGENT_HEARTBEAT)
            .dimensions(
                Dimension::builder()
                    .name(pmguard_agent::aws::names::DIM_INSTANCE_ID)
                    .value(instance)
                    .build(),
            )
            .start_time(start.into())
            .end_time(now.into())
            .period(60)
            .statistics(Statistic::SampleCount)
            .send()
            .await;
    match out {
        Ok(o) => {
            let latest = o
                .datapoints()
                .iter()
                .filter_map(|d| d.timestamp())
                .map(|t| t.secs())
                .max();
            let now_s = now
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            match latest {
                Some(t) if now_s - t <= 3 * aws.flush_interval.as_secs().max(60) as i64 => ok("metrics", format!("latest AgentHeartbeat datapoint {} s old", now_s - t)),
                Some(t) => fail("metrics", format!("latest AgentHeartbeat datapoint is {} s old", now_s - t), "check the agent's log for AWS errors (journalctl -u pmguard-agent | grep -i aws)"),
                None => fail("metrics", format!("no AgentHeartbeat from {instance} in the last hour"), "check that the agent runs with the [aws] section and that its role has cloudwatch:PutMetricData"),
            }
        }
        Err(e) => fail(
            "metrics",
            format!("GetMetricStatistics failed: {e}"),
            "grant cloudwatch:GetMetricStatistics to whoever runs doctor",
        ),
    }
}

/// Renders the checks as a table for a person.
pub fn table(checks: &[Check]) -> String {
    let mut out = String::new();
    let several = checks
        .iter()
        .filter_map(|c| c.unit.as_deref())
        .collect::<BTreeSet<_>>()
        .len()
        > 1;
    let mut last: Option<&str> = None;
    for c in checks {
        if several && c.unit.as_deref() != last {
            last = c.unit.as_deref();
            out.push_str(&format!("== {} ==\n", last.unwrap_or("?")));
        }
        let tag = match c.status {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        let mut lines = c.detail.lines();
        out.push_str(&format!(
            "{tag}  {:<22} {}\n",
            c.check,
            lines.next().unwrap_or("")
        ));
        for l in lines {
            out.push_str(&format!("      {:<22} {l}\n", ""));
        }
        if let Some(f) = &c.fix {
            out.push_str(&format!("      {:<22} fix: {f}\n", ""));
        }
    }
    let fails = checks.iter().filter(|c| c.status == Level::Fail).count();
    let warns = checks.iter().filter(|c| c.status == Level::Warn).count();
    out.push_str(&format!(
        "{} checks: {fails} failed, {warns} warnings\n",
        checks.len()
    ));
    out
}

/// Whether anything failed.
pub fn failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.status == Level::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::provision::AwsObserved;

    #[test]
    fn a_pending_subscription_is_a_warning_with_the_fix() {
        // The stand-ins confirm email subscriptions at once, so this state is built by hand.
        let c = Config::parse(
            Path::new("/c.toml"),
            "[[apps]]\nname = \"a\"\n[aws]\nsns_topic = \"t\"\nalarm_email = \"ops@example.com\"\n",
        )
        .unwrap();
        let mut obs = AwsObserved::default();
        obs.subscriptions
            .insert("ops@example.com".into(), "PendingConfirmation".into());
        let check = subscription_check(&c, &obs).unwrap();
        assert_eq!(check.status, Level::Warn);
        assert!(check.fix.unwrap().contains("Subscription Confirmation"));
        obs.subscriptions.insert(
            "ops@example.com".into(),
            "arn:aws:sns:us-east-1:1:t:abc".into(),
        );
        assert_eq!(subscription_check(&c, &obs).unwrap().status, Level::Ok);
        obs.subscriptions.clear();
        assert_eq!(subscription_check(&c, &obs).unwrap().status, Level::Fail);
    }

    #[test]
    fn a_table_of_several_agents_is_grouped_by_unit() {
        let of = |unit: &str, c: Check| Check {
            unit: Some(unit.into()),
            ..c
        };
        let t = table(&[
            of("pmguard-agent@alice.service", ok("config", "fine")),
            of("pmguard-agent@alice.service", ok("unit active", "active")),
            of("pmguard-agent@bob.service", ok("config", "fine")),
        ]);
        assert!(
            t.starts_with("== pmguard-agent@alice.service ==\nok    config"),
            "{t}"
        );
        assert!(
            t.contains("\n== pmguard-agent@bob.service ==\nok    config"),
            "{t}"
        );
        let one = table(&[of("pmguard-agent.service", ok("config", "fine"))]);
        assert!(!one.contains("=="), "{one}");
    }

    #[test]
    fn table_shows_fixes_under_failures() {
        let t = table(&[
            ok("config", "fine"),
            fail("pm2 daemon", "down", "pm2 resurrect"),
        ]);
        assert!(t.contains("FAIL  pm2 daemon"), "{t}");
        assert!(t.contains("fix: pm2 resurrect"), "{t}");
        assert!(t.ends_with("2 checks: 1 failed, 0 warnings\n"), "{t}");
    }
}
