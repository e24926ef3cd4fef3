//! Other monitors that restart PM2 apps: the set-up pmguard replaces (a `pm2-health-monitor.service`
//! looping over `monitor_health.sh`, a crontab line running `cron_health_check.sh`) or any like it.
//! Two monitors restarting one app fight each other, so `install` shows what it finds, and with
//! `--replace-legacy` stops it, recording what it changed so `uninstall` puts it back.
//!
//! Found by the seed's names and by content: a unit in /etc/systemd/system, or a line of a user
//! crontab, /etc/crontab or /etc/cron.d, whose command is (or runs a shell script that says)
//! `pm2 restart` or `pm2 reload`. PM2's own `pm2-<user>.service` runs `pm2 resurrect`, a node
//! script, and is never matched. Everything is read under a root (like DESTDIR).
//!
//! Invariants: a replaced crontab line is kept in its file, commented with [`CRON_MARK`], so the
//! change is visible where a person looks and reversible without a copy; a stopped unit's file is
//! never touched, only `systemctl disable --now`; the record of both is `RECORD_PATH`, removed
//! once everything is put back.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::render::{under, CRON_PATH, UNIT_NAME};
use crate::systemd::{Systemd, UnitState};
use crate::Error;

/// What a replaced crontab line is commented with.
pub const CRON_MARK: &str = "# disabled by pmguard install --replace-legacy: ";
/// The record of what `--replace-legacy` changed (removed by `uninstall` after putting it back).
pub const RECORD_PATH: &str = "/etc/pmguard/replaced-legacy.json";
const SEED_UNIT: &str = "pm2-health-monitor.service";
const SEED_SCRIPTS: &[&str] = &["monitor_health.sh", "cron_health_check.sh"];
const USER_CRONTABS: &str = "/var/spool/cron/crontabs";

/// One monitor found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Legacy {
    Unit {
        name: String,
        why: String,
    },
    CronLine {
        file: PathBuf,
        line: String,
        why: String,
    },
}

impl std::fmt::Display for Legacy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Legacy::Unit { name, why } => write!(f, "systemd unit {name} ({why})"),
            Legacy::CronLine { file, line, why } => {
                write!(f, "crontab line `{line}` in {} ({why})", file.display())
            }
        }
    }
}

/// What `--replace-legacy` changed, for `uninstall`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub units: Vec<StoppedUnit>,
    pub cron_lines: Vec<CronLine>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoppedUnit {
    pub name: String,
    pub was_enabled: bool,
    pub was_active: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CronLine {
    /// Absolute path on the target.
    pub file: PathBuf,
    pub line: String,
}

/// Why `command` (a unit's ExecStart or a crontab command) restarts PM2 apps, if it does.
/// `read` returns a file's text under the root (None when missing or unreadable).
pub fn restarts_pm2(command: &str, read: &dyn Fn(&Path) -> Option<String>) -> Option<String> {
    if let Some(what) = says_pm2_restart(command) {
        return Some(format!("runs `{what}`"));
    }
    for word in command.split_whitespace() {
        let word = word.trim_matches(|c| c == '"' || c == '\'' || c == ';');
        let Some(name) = word.rsplit('/').next() else {
            continue;
        };
        if SEED_SCRIPTS.contains(&name) {
            return Some(format!("runs {name}"));
        }
        if !word.starts_with('/') {
            continue;
        }
        let Some(text) = read(Path::new(word)) else {
            continue;
        };
        let shell = text.starts_with("#!") && text.lines().next().is_some_and(|l| l.contains("sh"));
        if let Some(what) = says_pm2_restart(&text).filter(|_| shell) {
            return Some(format!("{word} calls `{what}`"));
        }
    }
    None
}

/// A health monitor: `pm2 restart` or `pm2 reload` (the command, not `reloadLogs`) on a line
/// that is not a comment, in a text that also checks health (curl, wget, an http URL). A
/// scheduled `pm2 restart all` or a deploy hook's `pm2 reload` is not a monitor.
fn says_pm2_restart(text: &str) -> Option<&'static str> {
    let lines = || {
        text.lines()
            .map(|l| l.trim_start())
            .filter(|l| !l.starts_with('#'))
    };
    let word = |l: &str, phrase: &str| {
        l.match_indices(phrase).any(|(i, _)| {
            l[i + phrase.len()..]
                .chars()
                .next()
                .is_none_or(|c| c.is_whitespace() || matches!(c, ';' | '"' | '\'' | '&' | '|'))
        })
    };
    let checks = lines().any(|l| {
        ["curl ", "wget ", "http://", "https://"]
            .iter()
            .any(|w| l.contains(w))
    });
    ["pm2 restart", "pm2 reload"]
        .into_iter()
        .find(|phrase| lines().any(|l| word(l, phrase)))
        .filter(|_| checks)
}

/// The command of a crontab line: after 5 schedule fields (6 with a user field in system
/// crontabs), or after an `@reboot`-style nickname. None for comments, blanks and variables.
pub fn cron_command(line: &str, system: bool) -> Option<&str> {
    let t = line.trim_start();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    let first = t.split_whitespace().next()?;
    if !first.starts_with('@') && first.contains('=') {
        return None;
    }
    let fields = if first.starts_with('@') { 1 } else { 5 } + usize::from(system);
    let mut rest = t;
    for _ in 0..fields {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace)?;
        rest = &rest[end..];
    }
    let cmd = rest.trim();
    (!cmd.is_empty()).then_some(cmd)
}

/// Reads the record of a previous `--replace-legacy` (an empty one if there is none).
pub fn read_record(root: &Path) -> Result<Record, Error> {
    let path = under(root, Path::new(RECORD_PATH));
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|source| Error::LegacyRecord { path, source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
        Err(e) => Err(Error::io(path)(e)),
    }
}

/// Every monitor under `root` that restarts PM2 apps, except units already stopped by
/// `--replace-legacy` (in the record). Unreadable places are skipped: this is a warning, not a
/// gate.
pub fn find(root: &Path) -> Vec<Legacy> {
    let read = |p: &Path| -> Option<String> {
        let real = under(root, p);
        let meta = std::fs::metadata(&real).ok()?;
        if !meta.is_file() || meta.len() > 1 << 20 {
            return None;
        }
        std::fs::read_to_string(real).ok()
    };
    let stopped: Vec<String> = read_record(root)
        .map(|r| r.units.into_iter().map(|u| u.name).collect())
        .unwrap_or_default();
    let mut found = Vec::new();
    for name in list_dir(&under(root, Path::new("/etc/systemd/system"))) {
        // pmguard's own: the agent's units and pmguard-pm2*.service.
        let ours = name == UNIT_NAME || name.starts_with("pmguard-");
        if !name.ends_with(".service") || ours || stopped.contains(&name) {
            continue;
        }
        let Some(text) = read(&Path::new("/etc/systemd/system").join(&name)) else {
            continue;
        };
        let exec: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("ExecStart="))
            .collect();
        let why = exec.iter().find_map(|cmd| restarts_pm2(cmd, &read));
        let why =
            why.or_else(|| (name == SEED_UNIT).then(|| "the old health monitor's name".into()));
        if let Some(why) = why {
            found.push(Legacy::Unit { name, why });
        }
    }
    let mut crontabs: Vec<(PathBuf, bool)> = list_dir(&under(root, Path::new(USER_CRONTABS)))
        .into_iter()
        .map(|u| (Path::new(USER_CRONTABS).join(u), false))
        .collect();
    crontabs.push((PathBuf::from("/etc/crontab"), true));
    for name in list_dir(&under(root, Path::new("/etc/cron.d"))) {
        let path = Path::new("/etc/cron.d").join(name);
        // pmguard's own backup checks: /etc/cron.d/pmguard and /etc/cron.d/pmguard-<user>.
        let ours = path == Path::new(CRON_PATH)
            || path
                .to_str()
                .is_some_and(|p| p.starts_with(&format!("{CRON_PATH}-")));
        if !ours {
            crontabs.push((path, true));
        }
    }
    for (file, system) in crontabs {
        let Some(text) = read(&file) else { continue };
        for line in text.lines() {
            if let Some(why) = cron_command(line, system).and_then(|c| restarts_pm2(c, &read)) {
                found.push(Legacy::CronLine {
                    file: file.clone(),
                    line: line.to_string(),
                    why,
                });
            }
        }
    }
    found
}

fn list_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `text` with `line` commented out by [`CRON_MARK`] (every occurrence), and whether it changed.
pub fn disable_line(text: &str, line: &str) -> (String, bool) {
    map_lines(text, |l| (l == line).then(|| format!("{CRON_MARK}{l}")))
}

/// `text` with `line` put back where [`disable_line`] commented it out.
pub fn restore_line(text: &str, line: &str) -> (String, bool) {
    map_lines(text, |l| {
        (l.strip_prefix(CRON_MARK) == Some(line)).then(|| line.to_string())
    })
}

fn map_lines(text: &str, f: impl Fn(&str) -> Option<String>) -> (String, bool) {
    let mut changed = false;
    let mut out = String::with_capacity(text.len() + 64);
    for l in text.split_inclusive('\n') {
        let (body, nl) = l.strip_suffix('\n').map_or((l, ""), |b| (b, "\n"));
        match f(body) {
            Some(new) => {
                changed = true;
                out.push_str(&new);
            }
            None => out.push_str(body),
        }
        out.push_str(nl);
    }
    (out, changed)
}

/// Rewrites `file` (absolute, under `root`) with `edit`, atomically, keeping its mode and owner.
/// The rename also touches the directory, which is how cron notices a changed crontab.
fn edit_file(
    root: &Path,
    file: &Path,
    edit: impl Fn(&str) -> (String, bool),
) -> Result<bool, Error> {
    use std::os::unix::fs::MetadataExt;
    let real = under(root, file);
    let err = |e: std::io::Error| Error::io(&real)(e);
    let text = std::fs::read_to_string(&real).map_err(err)?;
    let (new, changed) = edit(&text);
    if !changed {
        return Ok(false);
    }
    let meta = std::fs::metadata(&real).map_err(err)?;
    // The owner is set on the new file before it replaces the old one: cron never sees a
    // crontab of the wrong owner, not even for a moment.
    pmguard_agent::sys::files::write_atomic_owned(
        &real,
        new.as_bytes(),
        meta.mode() & 0o7777,
        Some((meta.uid(), meta.gid())),
    )
    .map_err(err)?;
    Ok(true)
}

/// Stops every monitor in `found` and records it; returns what was done, for the user.
pub fn replace(root: &Path, found: &[Legacy], systemd: &dyn Systemd) -> Result<Vec<String>, Error> {
    let mut record = read_record(root)?;
    let mut done = Vec::new();
    for l in found {
        match l {
            Legacy::Unit { name, .. } => match systemd.state(name) {
                UnitState::Live { enabled, active } => {
                    systemd.run(&["disable", "--now", name])?;
                    record.units.push(StoppedUnit {
                        name: name.clone(),
                        was_enabled: enabled,
                        was_active: active,
                    });
                    done.push(format!("systemctl disable --now {name}"));
                }
                UnitState::Staged | UnitState::NoSystemd(_) => done.push(format!(
                    "{name}: systemd is not running here, so it was not stopped; once it runs: systemctl disable --now {name}"
                )),
            },
            Legacy::CronLine { file, line, .. } => {
                if edit_file(root, file, |t| disable_line(t, line))? {
                    record.cron_lines.push(CronLine {
                        file: file.clone(),
                        line: line.clone(),
                    });
                    done.push(format!("commented out `{line}` in {}", file.display()));
                }
            }
        }
    }
    if record != Record::default() {
        write_record(root, &record)?;
    }
    Ok(done)
}

fn write_record(root: &Path, record: &Record) -> Result<(), Error> {
    let path = under(root, Path::new(RECORD_PATH));
    let json = serde_json::to_vec_pretty(record).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    }
    pmguard_agent::sys::files::write_atomic(&path, &json, 0o644, true).map_err(Error::io(&path))
}

/// Puts back what `--replace-legacy` stopped (units re-enabled/started as they were, crontab
/// lines uncommented) and removes the record; returns what was done.
/// What cannot be put back (systemd not running here, a crontab gone) is said and stays in the
/// record for the next uninstall; it never stops the uninstall.
pub fn restore(root: &Path, systemd: &dyn Systemd, dry_run: bool) -> Result<Vec<String>, Error> {
    let record = read_record(root)?;
    let mut done = Vec::new();
    let mut left = Record::default();
    restore_units(&record, systemd, dry_run, &mut done, &mut left);
    restore_cron_lines(root, &record, dry_run, &mut done, &mut left);
    if !dry_run && record != Record::default() {
        if left == Record::default() {
            let path = under(root, Path::new(RECORD_PATH));
            std::fs::remove_file(&path).map_err(Error::io(&path))?;
        } else {
            write_record(root, &left)?;
        }
    }
    Ok(done)
}

/// Re-enables and restarts the recorded units as they were; what cannot be done is said in
/// `done` and kept in `left`.
fn restore_units(
    record: &Record,
    systemd: &dyn Systemd,
    dry_run: bool,
    done: &mut Vec<String>,
    left: &mut Record,
) {
    for u in &record.units {
        let live = matches!(systemd.state(&u.name), UnitState::Live { .. });
        let mut failed = !live && !dry_run;
        for (wanted, verb) in [(u.was_enabled, "enable"), (u.was_active, "start")] {
            if !wanted {
                continue;
            }
            if dry_run || !live {
                done.push(format!(
                    "systemctl {verb} {}{}",
                    u.name,
                    if live || dry_run {
                        ""
                    } else {
                        " (systemd is not running here: not done, kept for later)"
                    }
                ));
                continue;
            }
            match systemd.run(&[verb, &u.name]) {
                Ok(()) => done.push(format!("systemctl {verb} {}", u.name)),
                Err(e) => {
                    failed = true;
                    done.push(format!(
                        "could not put {} back ({e}); kept for later",
                        u.name
                    ));
                }
            }
        }
        if failed {
            left.units.push(u.clone());
        }
    }
}

/// Uncomments the recorded crontab lines; what cannot be done is said in `done` and kept in
/// `left`.
fn restore_cron_lines(
    root: &Path,
    record: &Record,
    dry_run: bool,
    done: &mut Vec<String>,
    left: &mut Record,
) {
    for c in &record.cron_lines {
        if dry_run {
            done.push(format!("uncomment `{}` in {}", c.line, c.file.display()));
            continue;
        }
        match edit_file(root, &c.file, |t| restore_line(t, &c.line)) {
            Ok(_) => done.push(format!("uncomment `{}` in {}", c.line, c.file.display())),
            Err(e) => {
                done.push(format!(
                    "could not uncomment `{}` ({e}); kept for later",
                    c.line
                ));
                left.cron_lines.push(c.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "#!/bin/bash\nwhile true; do\n  if ! curl -sf http://localhost:5000/api-health; then\n    pm2 restart codebox\n  fi\n  sleep 30\ndone\n";

    fn root_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = under(dir.path(), Path::new(path));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        dir
    }

    #[test]
    fn a_unit_running_a_script_that_restarts_pm2_apps_is_found_by_content() {
        let root = root_with(&[
            (
                "/etc/systemd/system/app-watch.service",
                "[Service]\nExecStart=/bin/bash /opt/watch/check.sh\n",
            ),
            ("/opt/watch/check.sh", SCRIPT),
            // PM2's own startup unit: `pm2 resurrect` through a node script, never a monitor.
            (
                "/etc/systemd/system/pm2-ubuntu.service",
                "[Service]\nExecStart=/usr/lib/node_modules/pm2/bin/pm2 resurrect\n",
            ),
            (
                "/usr/lib/node_modules/pm2/bin/pm2",
                "#!/usr/bin/env node\n// pm2 restart all\n",
            ),
            (
                "/etc/systemd/system/pmguard-agent.service",
                "[Service]\nExecStart=/usr/bin/pmguard-agent run\n",
            ),
        ]);
        assert_eq!(
            find(root.path()),
            [Legacy::Unit {
                name: "app-watch.service".into(),
                why: "/opt/watch/check.sh calls `pm2 restart`".into()
            }]
        );
    }

    #[test]
    fn the_seed_unit_is_found_by_name_and_its_cron_line_by_script_name() {
        let root = root_with(&[
            ("/etc/systemd/system/pm2-health-monitor.service", "[Service]\nExecStart=/home/ubuntu/automatenb/monitor_health.sh\n"),
            ("/var/spool/cron/crontabs/ubuntu", "# m h dom mon dow command\nMAILTO=\"\"\n*/3 * * * * /home/ubuntu/automatenb/cron_health_check.sh >> /tmp/cron.log 2>&1\n"),
            ("/etc/cron.d/pmguard", "*/5 * * * * ubuntu /usr/bin/pmguard-agent check --once\n"),
            // An hourly reload with no health check is a schedule, not a monitor.
            ("/etc/cron.d/restarter", "0 * * * * root pm2 reload all\n"),
            // A one-line monitor in a crontab: a check and a restart.
            ("/etc/cron.d/watch", "* * * * * root curl -sf http://127.0.0.1:5000/health || pm2 restart api\n"),
        ]);
        let found: Vec<String> = find(root.path()).iter().map(|l| l.to_string()).collect();
        assert_eq!(
            found,
            [
                "systemd unit pm2-health-monitor.service (runs monitor_health.sh)",
                "crontab line `*/3 * * * * /home/ubuntu/automatenb/cron_health_check.sh >> /tmp/cron.log 2>&1` in /var/spool/cron/crontabs/ubuntu (runs cron_health_check.sh)",
                "crontab line `* * * * * root curl -sf http://127.0.0.1:5000/health || pm2 restart api` in /etc/cron.d/watch (runs `pm2 restart`)",
            ]
        );
    }

    #[test]
    fn cron_commands_skip_schedule_user_comments_and_variables() {
        assert_eq!(
            cron_command("*/5 * * * * /x.sh -a", false),
            Some("/x.sh -a")
        );
        assert_eq!(cron_command("*/5 * * * * root /x.sh", true), Some("/x.sh"));
        assert_eq!(cron_command("@reboot /x.sh", false), Some("/x.sh"));
        assert_eq!(cron_command("# */5 * * * * /x.sh", false), None);
        assert_eq!(cron_command("PATH=/usr/bin:/bin", false), None);
    }

    struct NoSystemd;
    impl Systemd for NoSystemd {
        fn state(&self, _: &str) -> UnitState {
            UnitState::Staged
        }
        fn run(&self, args: &[&str]) -> Result<(), crate::Error> {
            panic!("systemctl {args:?} on a staged root")
        }
    }

    #[test]
    fn a_replaced_cron_line_is_commented_recorded_and_restored_exactly() {
        let crontab = "MAILTO=\"\"\n*/3 * * * * /home/ubuntu/automatenb/cron_health_check.sh\n0 4 * * * /usr/bin/backup\n";
        let root = root_with(&[("/var/spool/cron/crontabs/ubuntu", crontab)]);
        let file = root.path().join("var/spool/cron/crontabs/ubuntu");
        let found = find(root.path());
        let done = replace(root.path(), &found, &NoSystemd).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains(&format!("{CRON_MARK}*/3 * * * *")), "{text}");
        assert!(text.contains("\n0 4 * * * /usr/bin/backup\n"));
        assert!(
            find(root.path()).is_empty(),
            "a replaced line is no longer a monitor"
        );

        restore(root.path(), &NoSystemd, false).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), crontab);
        assert!(!under(root.path(), Path::new(RECORD_PATH)).exists());
    }

    #[test]
    fn scheduled_restarts_log_reloads_and_deploy_hooks_are_not_monitors() {
        let root = root_with(&[
            (
                "/var/spool/cron/crontabs/ubuntu",
                "0 0 * * * /usr/bin/pm2 reloadLogs\n30 3 * * 0 pm2 restart all --update-env\n",
            ),
            (
                "/etc/systemd/system/deploy-hook.service",
                "[Service]\nExecStart=/bin/sh /opt/deploy/hook.sh\n",
            ),
            (
                "/opt/deploy/hook.sh",
                "#!/bin/sh\ncd /srv/app && git pull && pm2 reload ecosystem.config.js\n",
            ),
        ]);
        assert!(find(root.path()).is_empty(), "{:?}", find(root.path()));
    }

    #[test]
    fn a_crontab_gone_before_uninstall_never_stops_the_uninstall() {
        let crontab = "*/3 * * * * /home/ubuntu/automatenb/cron_health_check.sh\n";
        let root = root_with(&[("/var/spool/cron/crontabs/ubuntu", crontab)]);
        let found = find(root.path());
        replace(root.path(), &found, &NoSystemd).unwrap();
        std::fs::remove_file(root.path().join("var/spool/cron/crontabs/ubuntu")).unwrap();
        let done = restore(root.path(), &NoSystemd, false).unwrap();
        assert!(
            done.iter().any(|d| d.contains("kept for later")),
            "{done:?}"
        );
        // The record keeps what could not be put back.
        let record = read_record(root.path()).unwrap();
        assert_eq!(record.cron_lines.len(), 1);
    }
}
