//! observe -> plan -> apply, for `install` and `uninstall`.
//!
//! `observe` reads what is on the target (under the root); `plan_install`/`plan_uninstall` are
//! pure and decide every step; `apply` carries the steps out, each file atomically (temp file in
//! the same directory, fsync, rename) with an explicit mode and owner, the manifest last. An up to
//! date host plans nothing ("Nothing to do.", not even an mtime changes); an install interrupted
//! anywhere converges on the next run, because every step is derived from what is observed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::layout::{Layout, Owner, TEMPLATE_PATH};
use crate::manifest::{sha256, Manifest};
use crate::render::{under, DesiredFile, FileKind};
use crate::systemd::{Systemd, UnitState};
use crate::Error;

/// A file as found on the target.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundFile {
    pub content: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// What is on the target now.
#[derive(Debug, Clone)]
pub struct Observed {
    pub files: BTreeMap<PathBuf, Option<FoundFile>>,
    /// Directories (among the parents of desired files) that do not exist yet.
    pub missing_dirs: Vec<PathBuf>,
    pub manifest: Option<Manifest>,
    pub unit: UnitState,
    /// `pmguard-pm2.service` (PM2 under systemd where `pm2 startup` was never run).
    pub pm2_unit: UnitState,
    /// A PM2 daemon runs now (set by the caller from `pm2.pid`): then `pmguard-pm2.service` is
    /// enabled for the next boot but not started (its `pm2 resurrect` must not meet a live daemon).
    pub pm2_daemon_live: bool,
    /// The agent's state directory when it is pmguard's own (`StateDirectory=` under
    /// /var/lib/pmguard*), from the installed config: uninstall removes it with the rest.
    pub state_dir: Option<PathBuf>,
    /// Modes of the existing directories pmguard owns (the config directory, and those it
    /// created), to put back when they drift (a root umask of 077 makes a fresh dir 0700).
    pub dir_modes: BTreeMap<PathBuf, u32>,
    /// Which install this is (the single-user layout, or one user's instance).
    pub layout: Layout,
    /// The box's other installs (other users' agents): what they share with this one.
    pub others: Vec<Other>,
    /// Temp files a write cut short left beside pmguard's files (`.<name>.pmguard-<pid>.tmp`):
    /// install and uninstall remove them.
    pub stale_tmp: Vec<PathBuf>,
    /// The PM2 user this install is for (set by the caller): recorded in the manifest, so an
    /// install cut short before its unit was written is still found as this user's.
    pub user: Option<String>,
    /// Whose install `layout` holds now: the manifest's user, else (single-user layout) what
    /// its files say (`layout::single_owner`); an instance is its user's. `None`: nothing
    /// tells (`check_owner`).
    pub owner: Option<Owner>,
}

/// Another user's install on the same box.
#[derive(Debug, Clone, PartialEq)]
pub struct Other {
    pub layout: Layout,
    pub user: Option<String>,
    pub manifest: Manifest,
    /// Paths its agent writes (from its installed config), which no second agent may share.
    pub state_dir: Option<PathBuf>,
    pub prometheus_textfile: Option<PathBuf>,
    /// An instance whose drop-in (written by a pmguard from before per-install `ExecStart=`) names
    /// no agent: it runs what the template names, so the template must not change under it.
    pub exec_from_template: bool,
    /// The `PM2_HOME` its unit gives its agent.
    pub pm2_home: Option<PathBuf>,
}

impl Other {
    fn lists(&self, path: &Path) -> bool {
        self.manifest.files.contains_key(path)
    }

    fn name(&self) -> String {
        self.user.clone().unwrap_or_else(|| self.layout.unit_name())
    }
}

/// The mode of every directory pmguard creates or owns: the PM2 user must reach its config.
pub const DIR_MODE: u32 = 0o755;

/// Reads the current state of every path in `paths` (and the manifest's) under `root`, for the
/// install `layout` names.
pub fn observe(
    root: &Path,
    paths: &[PathBuf],
    systemd: &dyn Systemd,
    layout: &Layout,
) -> Result<Observed, Error> {
    let manifest_path = layout.manifest_path();
    check_parents(root, &manifest_path)?;
    let manifest = Manifest::read(&under(root, &manifest_path))?;
    if let Some(m) = &manifest {
        m.check_owned(&under(root, &manifest_path), layout)?;
    }
    let others = observe_others(root, layout)?;
    let mut all: Vec<PathBuf> = paths.to_vec();
    if let Some(m) = &manifest {
        all.extend(m.files.keys().cloned());
    }
    all.push(manifest_path.clone());
    let mut files = BTreeMap::new();
    for p in all {
        files.insert(p.clone(), found(root, &p)?);
    }
    let stale_tmp = stale_tmp(root, files.keys());
    Ok(Observed {
        owner: owner_of(root, layout, manifest.as_ref()),
        stale_tmp,
        files,
        missing_dirs: missing_dirs(root, paths, &manifest_path),
        dir_modes: dir_modes(root, manifest.as_ref(), &manifest_path),
        manifest,
        unit: systemd.state(&layout.unit_name()),
        pm2_unit: systemd.state(&layout.pm2_unit_name()),
        pm2_daemon_live: false,
        user: None,
        state_dir: owned_state_dir(root, &layout.config_path()),
        layout: layout.clone(),
        others,
    })
}

/// Whose install `layout` holds (see `Observed::owner`).
fn owner_of(root: &Path, layout: &Layout, manifest: Option<&Manifest>) -> Option<Owner> {
    match layout {
        Layout::Instance(user) => Some(Owner {
            user: user.clone(),
            how: format!("the instance of {user}"),
            path: layout.manifest_path(),
        }),
        Layout::Single => manifest
            .and_then(|m| m.user.clone())
            .map(|user| Owner {
                how: format!("\"user\": \"{user}\""),
                user,
                path: layout.manifest_path(),
            })
            .or_else(|| crate::layout::single_owner(root)),
    }
}

/// Refuses to lay `user`'s install over one that is another user's, or that nothing says is
/// whose, where that would change anything it laid down (a file replaced or removed): `--force`
/// is about a config edited in place, never about whose install it is.
///
/// - Another user's: the single-user layout chosen for `user` while its files name someone
///   else (its manifest gone, e.g. moved aside: `layout::for_install` sends a second user to an
///   instance only when a manifest records the first). That user's install, re-run, records
///   it again; `take_over` does not apply.
/// - Nobody's: a manifest that names no user (written before the user was recorded, or with
///   none that is a name) and nothing laid down that names one. Refused unless `take_over`
///   says the install is `user`'s to take.
///
/// Completing an install cut short before it laid down anything of its user's (only creations
/// left, or the same bytes) is no takeover, and a box with neither manifest nor owner holds no
/// install to take.
pub fn check_owner(
    desired: &[DesiredFile],
    obs: &Observed,
    user: &str,
    take_over: bool,
) -> Result<(), Error> {
    if obs.owner.as_ref().is_some_and(|o| o.user == user) {
        return Ok(());
    }
    let changed = changed_files(desired, obs);
    if changed.is_empty() {
        return Ok(());
    }
    let files = changed
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    match (&obs.owner, &obs.manifest) {
        (Some(o), _) => Err(Error::OwnedByOther {
            evidence: format!("{} ({})", o.path.display(), o.how),
            other: o.user.clone(),
            user: user.to_string(),
            files,
        }),
        (None, Some(_)) if !take_over => Err(Error::UnknownOwner {
            manifest: obs.layout.manifest_path(),
            user: user.to_string(),
            files,
        }),
        (None, _) => Ok(()),
    }
}

/// This install's own files (not the shared ones) that installing `desired` would replace with
/// other bytes, or remove as no longer wanted.
fn changed_files(desired: &[DesiredFile], obs: &Observed) -> Vec<PathBuf> {
    let existing = |p: &Path| obs.files.get(p).cloned().flatten();
    let mut changed: Vec<PathBuf> = desired
        .iter()
        .filter(|f| !Layout::is_shared(&f.path))
        .filter(|f| existing(&f.path).is_some_and(|o| o.content != f.content))
        .map(|f| f.path.clone())
        .collect();
    if let Some(m) = &obs.manifest {
        changed.extend(
            m.files
                .keys()
                .filter(|p| !Layout::is_shared(p) && !desired.iter().any(|f| &f.path == *p))
                .filter(|p| existing(p).is_some())
                .cloned(),
        );
    }
    changed
}

/// Leftover `.<name>.pmguard-<pid>.tmp` files (see `write_file`) in the directories of `paths`:
/// regular files only, never through a symlink. No other pmguard runs meanwhile (`lock`).
fn stale_tmp<'a>(root: &Path, paths: impl Iterator<Item = &'a PathBuf>) -> Vec<PathBuf> {
    let mut dirs: Vec<&Path> = paths.filter_map(|p| p.parent()).collect();
    dirs.sort();
    dirs.dedup();
    let mut out = Vec::new();
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(under(root, d)) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let ours = name.starts_with('.')
                && name
                    .strip_suffix(".tmp")
                    .and_then(|n| n.rsplit_once(".pmguard-"))
                    .is_some_and(|(_, pid)| {
                        !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
                    });
            if ours && e.file_type().is_ok_and(|t| t.is_file()) {
                out.push(d.join(name));
            }
        }
    }
    out
}

/// One path under `root` as it is now (never through a symlink).
fn found(root: &Path, p: &Path) -> Result<Option<FoundFile>, Error> {
    check_parents(root, p)?;
    let real = under(root, p);
    match std::fs::symlink_metadata(&real) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::SymlinkFile { path: real }),
        Ok(m) => Ok(Some(FoundFile {
            content: std::fs::read(&real).map_err(Error::io(&real))?,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&real)(e)),
    }
}

/// The other installs on the box, each manifest checked like this one's.
fn observe_others(root: &Path, layout: &Layout) -> Result<Vec<Other>, Error> {
    let mut others = Vec::new();
    for i in crate::layout::installed(root)? {
        if i.layout == *layout {
            continue;
        }
        check_parents(root, &i.layout.manifest_path())?;
        i.manifest
            .check_owned(&under(root, &i.layout.manifest_path()), &i.layout)?;
        let config = installed_config(root, &i.layout.config_path());
        let exec_from_template = matches!(i.layout, Layout::Instance(_))
            && std::fs::read_to_string(under(root, &i.layout.unit_path()))
                .is_ok_and(|t| !t.lines().any(|l| l.starts_with("ExecStart=")));
        let unit_text =
            std::fs::read_to_string(under(root, &i.layout.unit_path())).unwrap_or_default();
        let pm2_home = unit_text
            .lines()
            .find_map(|l| l.strip_prefix("Environment=PM2_HOME="))
            .map(PathBuf::from);
        others.push(Other {
            pm2_home,
            exec_from_template,
            state_dir: config.as_ref().map(|c| c.agent.state_dir.clone()),
            prometheus_textfile: config.and_then(|c| c.agent.prometheus_textfile),
            layout: i.layout,
            user: i.user,
            manifest: i.manifest,
        });
    }
    Ok(others)
}

fn installed_config(root: &Path, config: &Path) -> Option<pmguard_agent::config::Config> {
    let text = std::fs::read_to_string(under(root, config)).ok()?;
    pmguard_agent::config::Config::parse(config, &text).ok()
}

/// Refuses a config whose agent would write where another user's agent writes: one state
/// directory holds one agent's lock, history and events; one textfile one agent's metrics. A
/// state directory inside another's (or around it) is refused too: uninstalling the outer one
/// deletes the inner one, and `StateDirectory=` hands the outer one to its user alone. The same
/// holds for a textfile's directory against another agent's state directory.
pub fn check_shared_paths(
    config: &pmguard_agent::config::Config,
    user: &str,
    obs: &Observed,
) -> Result<(), Error> {
    let state = config.agent.state_dir.as_path();
    let textfile = config.agent.prometheus_textfile.as_deref();
    let state_fix = format!("set a path of {user}'s own, beside the others and not inside them, e.g. [agent] state_dir = \"/var/lib/pmguard-{user}\"");
    let textfile_fix = format!("set a path of {user}'s own in its config, e.g. [agent] prometheus_textfile = \"/var/lib/prometheus/node-exporter/pmguard-{user}.prom\"");
    for o in &obs.others {
        let their_textfile = o.prometheus_textfile.as_deref();
        let shared = |what: &'static str, path: &Path, theirs: String, fix: &str| {
            Err(Error::SharedPath {
                what,
                path: path.to_path_buf(),
                theirs,
                other: o.name(),
                fix: fix.to_string(),
            })
        };
        if let Some(theirs) = o.state_dir.as_deref() {
            if nested(state, theirs) {
                return shared(
                    "state directory",
                    state,
                    format!("state directory {}", theirs.display()),
                    &state_fix,
                );
            }
            if let Some(dir) = textfile
                .and_then(Path::parent)
                .filter(|d| nested(d, theirs))
            {
                return shared(
                    "Prometheus textfile directory",
                    dir,
                    format!("state directory {}", theirs.display()),
                    &textfile_fix,
                );
            }
        }
        if let Some(dir) = their_textfile
            .and_then(Path::parent)
            .filter(|d| nested(state, d))
        {
            return shared(
                "state directory",
                state,
                format!("Prometheus textfile directory {}", dir.display()),
                &state_fix,
            );
        }
        if let (Some(a), Some(b)) = (textfile, their_textfile) {
            if a == b {
                return shared(
                    "Prometheus textfile",
                    a,
                    format!("Prometheus textfile {}", b.display()),
                    &textfile_fix,
                );
            }
        }
    }
    Ok(())
}

/// Refuses a `PM2_HOME` another install's agent watches (the same directory, or a symlink to
/// it), and with `check_owner` one the account does not own: the agent would watch, and
/// restart, another user's PM2 apps. Paths are resolved under `root`. `check_owner` is for a
/// live install: a staging root's passwd names users who own nothing on the host.
pub fn check_pm2_home(
    root: &Path,
    home: &Path,
    account: &crate::users::Account,
    obs: &Observed,
    check_owner: bool,
) -> Result<(), Error> {
    let real = under(root, home);
    let resolved = real.canonicalize().unwrap_or_else(|_| real.clone());
    for o in &obs.others {
        let Some(theirs) = &o.pm2_home else { continue };
        let t = under(root, theirs);
        if theirs == home || t.canonicalize().is_ok_and(|t| t == resolved) {
            return Err(Error::SharedPath {
                what: "PM2_HOME",
                path: home.to_path_buf(),
                theirs: format!("PM2_HOME {}", theirs.display()),
                other: o.name(),
                fix: format!("each agent watches its own user's PM2: set [agent] pm2_home to {}'s own (or leave it out for ~{}/.pm2)", account.user, account.user),
            });
        }
    }
    if check_owner {
        if let Ok(m) = std::fs::metadata(&real) {
            if m.uid() != account.uid {
                return Err(Error::Pm2HomeNotOwned {
                    path: home.to_path_buf(),
                    uid: m.uid(),
                    user: account.user.clone(),
                });
            }
        }
    }
    Ok(())
}

/// One path is the other or lies inside it (component-wise: /var/lib/pmguard-a is beside
/// /var/lib/pmguard, not in it).
fn nested(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The parents of `paths` (and of the manifest) that do not exist under `root`, outermost
/// first.
fn missing_dirs(root: &Path, paths: &[PathBuf], manifest_path: &Path) -> Vec<PathBuf> {
    let mut missing_dirs = Vec::new();
    let manifest_path = manifest_path.to_path_buf();
    for p in paths.iter().chain(std::iter::once(&manifest_path)) {
        let mut dir = p.parent();
        let mut chain = Vec::new();
        while let Some(d) = dir {
            if d == Path::new("/") || under(root, d).exists() {
                break;
            }
            chain.push(d.to_path_buf());
            dir = d.parent();
        }
        for d in chain.into_iter().rev() {
            if !missing_dirs.contains(&d) {
                missing_dirs.push(d);
            }
        }
    }
    missing_dirs
}

/// The modes of the directories pmguard owns: the config directory and those it created.
fn dir_modes(
    root: &Path,
    manifest: Option<&Manifest>,
    manifest_path: &Path,
) -> BTreeMap<PathBuf, u32> {
    let mut dir_modes = BTreeMap::new();
    let owned_dirs = manifest
        .into_iter()
        .flat_map(|m| m.created_dirs.iter().cloned())
        .chain(manifest_path.parent().map(Path::to_path_buf));
    for d in owned_dirs {
        if let Ok(m) = std::fs::symlink_metadata(under(root, &d)) {
            if m.is_dir() {
                dir_modes.insert(d, m.mode() & 0o7777);
            }
        }
    }
    dir_modes
}

/// The installed config's `state_dir`, if it is one systemd made for pmguard's unit
/// (`/var/lib/pmguard` or `/var/lib/pmguard-*`: `render::check_values` allows no other under
/// /var/lib) and it is a real directory.
fn owned_state_dir(root: &Path, config: &Path) -> Option<PathBuf> {
    let dir = installed_config(root, config)?.agent.state_dir;
    let rel = dir.strip_prefix("/var/lib").ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let ours = first.starts_with("pmguard")
        && rel.components().count() == 1
        && dir.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        });
    let m = std::fs::symlink_metadata(under(root, &dir)).ok()?;
    (ours && m.is_dir()).then_some(dir)
}

/// Walks from `root` to `path`'s parent without following symlinks: every directory on the way
/// must be one `trusted_dir` takes. Otherwise a local user could swap a directory for a
/// symlink, or a file in it, between our check and root's write.
fn check_parents(root: &Path, path: &Path) -> Result<(), Error> {
    let root_uid = std::fs::metadata(root).map_err(Error::io(root))?.uid();
    let mut real = root.to_path_buf();
    let parent = path.parent().unwrap_or(Path::new("/"));
    for c in parent.components() {
        let std::path::Component::Normal(name) = c else {
            if matches!(c, std::path::Component::RootDir) {
                continue;
            }
            return Err(Error::NotNormalPath {
                path: path.to_path_buf(),
            });
        };
        real.push(name);
        let m = match std::fs::symlink_metadata(&real) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(&real)(e)),
        };
        trusted_dir(&real, &m, root_uid)?;
    }
    Ok(())
}

/// A directory root may write into: a real directory (not a symlink), owned by whoever owns
/// the root (root on a live box), and writable by nobody else. No exception for a sticky
/// directory: anyone may still create entries in one (a directory or a symlink where pmguard is
/// about to make one), and none of pmguard's directories is legitimately one.
fn trusted_dir(real: &Path, m: &std::fs::Metadata, root_uid: u32) -> Result<(), Error> {
    let path = real.to_path_buf();
    if m.file_type().is_symlink() {
        return Err(Error::SymlinkDir { path });
    }
    if !m.is_dir() {
        return Err(Error::NotADirectory { path });
    }
    if m.uid() != root_uid || m.mode() & 0o022 != 0 {
        return Err(Error::WritableByOthers {
            path,
            uid: m.uid(),
            mode: m.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Creates `path` under `root` with `DIR_MODE`. It was missing when observed: one there now was
/// made meanwhile, and is taken only if `trusted_dir` takes it (a symlink would have the chmod
/// and every file meant for it land where it points).
fn make_dir(root: &Path, path: &Path) -> Result<(), Error> {
    let real = under(root, path);
    match std::fs::DirBuilder::new().mode(DIR_MODE).create(&real) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let root_uid = std::fs::metadata(root).map_err(Error::io(root))?.uid();
            let m = std::fs::symlink_metadata(&real).map_err(Error::io(&real))?;
            trusted_dir(&real, &m, root_uid)?;
        }
        Err(e) => return Err(Error::apply("create", &real)(e)),
    }
    // The umask narrowed the mode at create (077 makes it 0700): set it exactly.
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(DIR_MODE))
        .map_err(Error::apply("chmod", &real))
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    MkDir {
        path: PathBuf,
    },
    Write {
        file: DesiredFile,
        old: Option<FoundFile>,
    },
    Remove {
        path: PathBuf,
        old: FoundFile,
    },
    RemoveDir {
        path: PathBuf,
    },
    /// A temp file a write cut short left behind.
    RemoveTmp {
        path: PathBuf,
    },
    /// The agent's state directory and everything in it (events, restart history, spool).
    RemoveTree {
        path: PathBuf,
    },
    /// An existing directory pmguard owns whose mode drifted.
    DirMode {
        path: PathBuf,
        from: u32,
    },
    Systemctl {
        args: Vec<String>,
    },
}

/// What install or uninstall will do.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Said to the user, e.g. skipped systemd steps.
    pub notes: Vec<String>,
    /// Why the plan must not be applied without `--force` (with the diff to show).
    pub blocked: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

fn metadata_differs(f: &DesiredFile, old: &FoundFile, can_chown: bool) -> bool {
    old.mode != f.mode || (can_chown && (old.uid != f.uid || old.gid != f.gid))
}

/// Plans an install of `desired` over what was observed.
pub fn plan_install(desired: &[DesiredFile], obs: &Observed, force: bool, can_chown: bool) -> Plan {
    let mut plan = Plan::default();
    let manifest = next_manifest(desired, obs);
    let changed = plan_writes(desired, obs, force, can_chown, &mut plan);
    plan_stale_removals(desired, obs, &mut plan);
    block_template_change(obs, &mut plan);
    plan.steps.splice(0..0, head_steps(obs, &manifest));
    // Only once the shared files hold the new bytes: an install cut short while writing one
    // leaves the other manifests matching what is still there, so the last uninstall removes it.
    plan.steps.extend(shared_hash_updates(desired, obs));
    plan.steps.extend(tmp_removals(obs));
    plan_units(desired, obs, changed, &mut plan);
    let unit = obs.layout.unit_name();
    plan.notes.push(format!("Logs go to the journal (journalctl -u {}); the logrotate file rotates only the agent's event file.", unit.trim_end_matches(".service")));
    plan
}

/// A template rewrite while another instance still takes its `ExecStart=` from the template
/// (installed by an older pmguard): that agent would lose its command line. Its own install,
/// re-run first, gives it one in its drop-in.
fn block_template_change(obs: &Observed, plan: &mut Plan) {
    let template_written = plan
        .steps
        .iter()
        .any(|s| matches!(s, Step::Write { file, .. } if file.path == Path::new(TEMPLATE_PATH)));
    if !template_written {
        return;
    }
    for o in obs.others.iter().filter(|o| o.exec_from_template) {
        plan.blocked.push(format!(
            "{} was installed by an older pmguard and runs the agent named in {TEMPLATE_PATH}, which this install rewrites; re-run its install first: sudo pmguard install --user {} --config {}",
            o.layout.unit_name(),
            o.name(),
            o.layout.config_path().display()
        ));
    }
}

fn tmp_removals(obs: &Observed) -> impl Iterator<Item = Step> + '_ {
    obs.stale_tmp
        .iter()
        .map(|p| Step::RemoveTmp { path: p.clone() })
}

/// Which units' files a plan rewrites (so systemd reloads and restarts what changed).
#[derive(Debug, Clone, Copy, Default)]
struct Changed {
    service: bool,
    pm2_unit: bool,
    /// A file every install runs (the agent binary, the template unit): the other agents
    /// restart too.
    shared: bool,
}

/// The other installs' manifests, where they list a shared file this install lays down with
/// other bytes: it now holds these bytes, so whichever install is removed last still
/// recognises it as pmguard's and removes it.
fn shared_hash_updates(desired: &[DesiredFile], obs: &Observed) -> Vec<Step> {
    let mut steps = Vec::new();
    for o in &obs.others {
        let mut m = o.manifest.clone();
        for f in desired.iter().filter(|f| Layout::is_shared(&f.path)) {
            if let Some(h) = m.files.get_mut(&f.path) {
                *h = sha256(&f.content);
            }
        }
        if m != o.manifest {
            steps.push(Step::Write {
                file: DesiredFile {
                    path: o.layout.manifest_path(),
                    content: m.to_bytes(),
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    kind: FileKind::Managed,
                },
                old: Some(FoundFile {
                    content: o.manifest.to_bytes(),
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                }),
            });
        }
    }
    steps
}

/// The manifest this install leaves: every desired file's hash, and every directory any
/// install so far has created.
fn next_manifest(desired: &[DesiredFile], obs: &Observed) -> Manifest {
    let mut manifest = Manifest {
        version: env!("CARGO_PKG_VERSION").to_string(),
        files: BTreeMap::new(),
        created_dirs: obs
            .manifest
            .as_ref()
            .map(|m| m.created_dirs.clone())
            .unwrap_or_default(),
        unit: Some(obs.layout.unit_name()),
        user: obs.user.clone(),
    };
    // Directories another install created that this one's files live in too: whichever
    // install is removed last removes them.
    let inherited = obs
        .others
        .iter()
        .flat_map(|o| o.manifest.created_dirs.iter())
        .filter(|d| desired.iter().any(|f| f.path.starts_with(d)));
    let own = obs.layout.own_dirs();
    for d in obs.missing_dirs.iter().chain(inherited).chain(own.iter()) {
        if !manifest.created_dirs.contains(d) {
            manifest.created_dirs.push(d.clone());
        }
    }
    for f in desired {
        manifest.files.insert(f.path.clone(), sha256(&f.content));
    }
    manifest
}

/// A write for every desired file that differs from what is there, except a user's edit of
/// the config without `force` (blocked, with the diff).
fn plan_writes(
    desired: &[DesiredFile],
    obs: &Observed,
    force: bool,
    can_chown: bool,
    plan: &mut Plan,
) -> Changed {
    let mut changed = Changed::default();
    for f in desired {
        let old = obs.files.get(&f.path).cloned().flatten();
        let needs = match &old {
            None => true,
            Some(o) => o.content != f.content || metadata_differs(f, o, can_chown),
        };
        if !needs {
            continue;
        }
        if let (FileKind::UserConfig, Some(o)) = (f.kind, &old) {
            let ours = obs
                .manifest
                .as_ref()
                .and_then(|m| m.files.get(&f.path))
                .is_some_and(|h| *h == sha256(&o.content));
            if o.content != f.content && !ours && !force {
                plan.blocked.push(format!(
                    "{} was edited since pmguard installed it (or was not installed by pmguard); re-run with --force to replace it:\n{}",
                    f.path.display(),
                    diff(&o.content, &f.content)
                ));
                continue;
            }
        }
        if f.path == obs.layout.pm2_unit_path() {
            changed.pm2_unit = true;
        } else {
            changed.service |= f.path == obs.layout.unit_path()
                || f.path == Path::new(TEMPLATE_PATH)
                || f.kind != FileKind::Managed;
            changed.shared |= Layout::is_shared(&f.path);
        }
        plan.steps.push(Step::Write {
            file: f.clone(),
            old,
        });
    }
    changed
}

/// Files a previous install laid down that are no longer wanted (e.g. the IAM policy after
/// [aws] was removed from the config): removed unless edited since.
fn plan_stale_removals(desired: &[DesiredFile], obs: &Observed, plan: &mut Plan) {
    let Some(m) = &obs.manifest else { return };
    for (path, hash) in &m.files {
        if desired.iter().any(|f| &f.path == path) || shared_with_others(obs, path) {
            continue;
        }
        if let Some(Some(old)) = obs.files.get(path) {
            if sha256(&old.content) == *hash {
                plan.steps.push(Step::Remove {
                    path: path.clone(),
                    old: old.clone(),
                });
            } else {
                plan.notes.push(format!(
                    "{} is no longer needed but was edited since install: left in place",
                    path.display()
                ));
            }
        }
    }
}

/// A file another install lists too (the agent binary, the template unit): it stays while
/// any install uses it.
fn shared_with_others(obs: &Observed, path: &Path) -> bool {
    Layout::is_shared(path) && obs.others.iter().any(|o| o.lists(path))
}

/// The steps that go before the files: the manifest first (after its own directories), so an
/// install cut short anywhere later still records every directory and file it may have
/// created and uninstall removes them; then the other directories and drifted modes.
fn head_steps(obs: &Observed, manifest: &Manifest) -> Vec<Step> {
    let mut head = Vec::new();
    let manifest_path = obs.layout.manifest_path();
    let manifest_dir = manifest_path.parent().unwrap_or(Path::new("/"));
    let (first, rest): (Vec<&PathBuf>, Vec<&PathBuf>) = obs
        .missing_dirs
        .iter()
        .partition(|d| manifest_dir.starts_with(d));
    head.extend(first.into_iter().map(|d| Step::MkDir { path: d.clone() }));
    let manifest_bytes = manifest.to_bytes();
    let old_manifest = obs.files.get(&manifest_path).cloned().flatten();
    if old_manifest.as_ref().map(|o| &o.content) != Some(&manifest_bytes) {
        head.push(Step::Write {
            file: DesiredFile {
                path: manifest_path.clone(),
                content: manifest_bytes,
                mode: 0o644,
                uid: 0,
                gid: 0,
                kind: FileKind::Managed,
            },
            old: old_manifest,
        });
    }
    head.extend(rest.into_iter().map(|d| Step::MkDir { path: d.clone() }));
    for (d, mode) in &obs.dir_modes {
        if *mode != DIR_MODE {
            head.push(Step::DirMode {
                path: d.clone(),
                from: *mode,
            });
        }
    }
    head
}

/// systemctl steps for the agent's unit and `pmguard-pm2.service`, or a note when there is no
/// systemd to run them.
fn plan_units(desired: &[DesiredFile], obs: &Observed, changed: Changed, plan: &mut Plan) {
    let unit = obs.layout.unit_name();
    let (enabled, active) = match &obs.unit {
        UnitState::Staged => {
            plan.notes
                .push("Staging root: files only; nothing is started.".into());
            return;
        }
        UnitState::NoSystemd(why) => {
            plan.notes.push(format!(
                "systemd is not running here ({why}): skipped daemon-reload, enable and start. Once it runs: systemctl daemon-reload && systemctl enable --now {unit}"
            ));
            return;
        }
        UnitState::Live { enabled, active } => (*enabled, *active),
    };
    if changed.service || changed.pm2_unit {
        plan.steps.push(systemctl(&["daemon-reload"]));
    }
    plan_pm2_unit(desired, obs, plan);
    if !enabled {
        plan.steps.push(systemctl(&["enable", &unit]));
    }
    if changed.service || !active {
        plan.steps.push(systemctl(&["restart", &unit]));
    }
    if changed.shared {
        // The other agents run the same binary and template: only those running restart.
        for o in &obs.others {
            plan.steps
                .push(systemctl(&["try-restart", &o.layout.unit_name()]));
        }
    }
}

/// `pmguard-pm2.service` (or `pmguard-pm2-<user>.service`) enabled, and started when no PM2
/// daemon runs.
fn plan_pm2_unit(desired: &[DesiredFile], obs: &Observed, plan: &mut Plan) {
    let name = obs.layout.pm2_unit_name();
    let ours = desired.iter().any(|f| f.path == obs.layout.pm2_unit_path());
    if let (true, UnitState::Live { enabled, active }) = (ours, &obs.pm2_unit) {
        if !enabled {
            plan.steps.push(systemctl(&["enable", &name]));
        }
        if !active && !obs.pm2_daemon_live {
            plan.steps.push(systemctl(&["start", &name]));
        } else if !active {
            plan.notes.push(format!(
                "PM2 runs outside systemd now: {name} starts it from the next boot. To hand the running daemon over now (the apps restart once): `sudo -u <user> pm2 save && sudo -u <user> pm2 kill && sudo systemctl start {name}`"
            ));
        }
    }
}

/// Plans an uninstall from the manifest: this install's files, and the shared ones only when
/// no other install lists them.
pub fn plan_uninstall(obs: &Observed) -> Plan {
    let mut plan = Plan::default();
    let Some(m) = &obs.manifest else {
        plan.notes
            .push("No install manifest: pmguard is not installed here (nothing removed).".into());
        return plan;
    };
    let unit = obs.layout.unit_name();
    if let UnitState::Live { enabled, active } = &obs.unit {
        if *active || *enabled {
            plan.steps.push(systemctl(&["disable", "--now", &unit]));
        }
    }
    let pm2_unit = obs.layout.pm2_unit_name();
    if m.files.contains_key(&obs.layout.pm2_unit_path()) {
        // Not `--now`: stopping it would stop PM2 and every app. PM2 keeps running.
        if let UnitState::Live { enabled: true, .. } = &obs.pm2_unit {
            plan.steps.push(systemctl(&["disable", &pm2_unit]));
        }
        plan.notes.push(format!(
            "PM2 keeps running, no longer supervised by {pm2_unit}: run `pm2 startup` to have systemd keep it."
        ));
    }
    uninstall_files(obs, m, &mut plan);
    plan.steps.extend(tmp_removals(obs));
    let manifest_path = obs.layout.manifest_path();
    if let Some(Some(old)) = obs.files.get(&manifest_path) {
        plan.steps.push(Step::Remove {
            path: manifest_path,
            old: old.clone(),
        });
    }
    // Deepest first, whatever order installs recorded them in; only empty ones go.
    let mut dirs = m.created_dirs.clone();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        plan.steps.push(Step::RemoveDir { path: d });
    }
    plan_state_removal(obs, &mut plan);
    if matches!(obs.unit, UnitState::Live { .. }) {
        plan.steps.push(systemctl(&["daemon-reload"]));
    }
    plan
}

/// The agent's state directory goes with it, unless another install's agent uses it (a config
/// edited by hand since install to another's `state_dir`: install refuses that, uninstall must
/// not delete that agent's history and events).
fn plan_state_removal(obs: &Observed, plan: &mut Plan) {
    let Some(dir) = &obs.state_dir else { return };
    let sharer = obs
        .others
        .iter()
        .find(|o| o.state_dir.as_deref().is_some_and(|t| nested(dir, t)));
    match sharer {
        Some(o) => plan.notes.push(format!(
            "{} is kept: {}'s agent uses it too",
            dir.display(),
            o.name()
        )),
        None => plan.steps.push(Step::RemoveTree { path: dir.clone() }),
    }
}

/// Removes every file the manifest lists that is still what install wrote, except shared
/// files another install still uses.
fn uninstall_files(obs: &Observed, m: &Manifest, plan: &mut Plan) {
    for (path, hash) in &m.files {
        let Some(Some(old)) = obs.files.get(path) else {
            continue;
        };
        if let Some(o) = obs
            .others
            .iter()
            .find(|o| Layout::is_shared(path) && o.lists(path))
        {
            plan.notes.push(format!(
                "{} is kept: {} uses it too",
                path.display(),
                o.layout.unit_name()
            ));
            continue;
        }
        // Only what is still exactly what install wrote: anything else is someone's file now.
        if sha256(&old.content) != *hash {
            plan.notes.push(format!(
                "{} was changed since install: kept (remove it by hand if you no longer need it)",
                path.display()
            ));
            continue;
        }
        plan.steps.push(Step::Remove {
            path: path.clone(),
            old: old.clone(),
        });
    }
}

fn systemctl(args: &[&str]) -> Step {
    Step::Systemctl {
        args: args.iter().map(|s| s.to_string()).collect(),
    }
}

/// A unified diff of two texts (or a one-line note for binaries).
pub fn diff(old: &[u8], new: &[u8]) -> String {
    match (std::str::from_utf8(old), std::str::from_utf8(new)) {
        (Ok(a), Ok(b)) => similar::TextDiff::from_lines(a, b)
            .unified_diff()
            .context_radius(2)
            .header("installed", "pmguard")
            .to_string(),
        _ => format!(
            "binary differs: sha256 {} -> {}\n",
            &sha256(old)[..16],
            &sha256(new)[..16]
        ),
    }
}

/// The plan as shown to a person (and snapshot-tested).
pub fn display(plan: &Plan) -> String {
    let mut out = String::new();
    for b in &plan.blocked {
        let _ = writeln!(out, "BLOCKED: {b}");
    }
    if plan.steps.is_empty() {
        let _ = writeln!(out, "Nothing to do.");
    }
    for s in &plan.steps {
        display_step(&mut out, s);
    }
    for n in &plan.notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}

/// One step as the plan shows it (a write of changed content with its diff, indented).
fn display_step(out: &mut String, s: &Step) {
    match s {
        Step::MkDir { path } => {
            let _ = writeln!(out, "create directory {}", path.display());
        }
        Step::Write { file, old: None } => {
            let _ = writeln!(
                out,
                "create {} (mode {:04o})",
                file.path.display(),
                file.mode
            );
        }
        Step::Write { file, old: Some(o) } => {
            if o.content == file.content {
                let _ = writeln!(
                    out,
                    "fix mode/owner of {}: {:04o} {}:{} -> {:04o} {}:{}",
                    file.path.display(),
                    o.mode,
                    o.uid,
                    o.gid,
                    file.mode,
                    file.uid,
                    file.gid
                );
            } else {
                let _ = writeln!(out, "update {}", file.path.display());
                out.push_str(&indent(&diff(&o.content, &file.content)));
            }
        }
        Step::Remove { path, .. } => {
            let _ = writeln!(out, "remove {}", path.display());
        }
        Step::RemoveDir { path } => {
            let _ = writeln!(out, "remove directory {} (if empty)", path.display());
        }
        Step::RemoveTmp { path } => display_tmp(out, path),
        Step::RemoveTree { path } => {
            let _ = writeln!(
                out,
                "remove the agent's state {} (events, restart history)",
                path.display()
            );
        }
        Step::DirMode { path, from } => {
            let _ = writeln!(
                out,
                "fix mode of directory {}: {from:04o} -> {DIR_MODE:04o}",
                path.display()
            );
        }
        Step::Systemctl { args } => {
            let _ = writeln!(out, "systemctl {}", args.join(" "));
        }
    }
}

fn display_tmp(out: &mut String, path: &Path) {
    let _ = writeln!(
        out,
        "remove {} (left by an interrupted install)",
        path.display()
    );
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

/// Carries out a plan under `root`. Stops at the first failure (the next run converges).
pub fn apply(
    plan: &Plan,
    root: &Path,
    systemd: &dyn Systemd,
    can_chown: bool,
) -> Result<(), Error> {
    for s in &plan.steps {
        match s {
            Step::MkDir { path } => make_dir(root, path)?,
            Step::RemoveTree { path } => {
                // remove_dir_all never follows a symlink inside (the PM2 user owns the tree).
                let real = under(root, path);
                match std::fs::remove_dir_all(&real) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::apply("remove", &real)(e)),
                }
            }
            Step::DirMode { path, .. } => {
                let real = under(root, path);
                std::fs::set_permissions(&real, std::fs::Permissions::from_mode(DIR_MODE))
                    .map_err(Error::apply("chmod", &real))?;
            }
            Step::Write { file, .. } => write_file(root, file, can_chown)?,
            Step::Remove { path, .. } | Step::RemoveTmp { path } => {
                let real = under(root, path);
                match std::fs::remove_file(&real) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::apply("remove", &real)(e)),
                }
            }
            Step::RemoveDir { path } => {
                // Only when empty: anything the user put there stays.
                let _ = std::fs::remove_dir(under(root, path));
            }
            Step::Systemctl { args } => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                systemd.run(&args)?;
            }
        }
    }
    Ok(())
}

fn write_file(root: &Path, f: &DesiredFile, can_chown: bool) -> Result<(), Error> {
    let real = under(root, &f.path);
    let dir = real
        .parent()
        .ok_or_else(|| Error::NoParent { path: real.clone() })?;
    let tmp = dir.join(format!(
        ".{}.pmguard-{}.tmp",
        real.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        file.write_all(&f.content)?;
        if can_chown {
            std::os::unix::fs::fchown(&file, Some(f.uid), Some(f.gid))?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(f.mode))?;
        file.sync_all()?;
        std::fs::rename(&tmp, &real)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::apply("write", &real)(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::{rendered, FULL, MINIMAL};
    use crate::render::{CONFIG_PATH, MANIFEST_PATH, UNIT_PATH};
    use crate::systemd::Systemctl;

    const STAGED: Systemctl = Systemctl { staged: true };

    /// Every file under `root` with its bytes and mode: what "exactly as before" compares.
    fn tree(root: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let m = std::fs::symlink_metadata(&p).unwrap();
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                if m.is_dir() {
                    out.insert(rel, (Vec::new(), m.mode()));
                    stack.push(p);
                } else {
                    out.insert(rel, (std::fs::read(&p).unwrap(), m.mode()));
                }
            }
        }
        out
    }

    fn install(root: &Path, config: &str, force: bool) -> Plan {
        let desired = rendered(config);
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let obs = observe(root, &paths, &STAGED, &Layout::Single).unwrap();
        let plan = plan_install(&desired, &obs, force, false);
        if plan.blocked.is_empty() {
            apply(&plan, root, &STAGED, false).unwrap();
        }
        plan
    }

    fn replan(root: &Path, config: &str) -> Plan {
        let desired = rendered(config);
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        plan_install(
            &desired,
            &observe(root, &paths, &STAGED, &Layout::Single).unwrap(),
            false,
            false,
        )
    }

    fn user_files(root: &Path) {
        std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
        std::fs::write(
            root.join("etc/systemd/system/other.service"),
            "[Service]\nExecStart=/bin/true\n",
        )
        .unwrap();
    }

    /// Installs `config` for `user` as `install --user` would: the layout it picks, with the
    /// other installs observed.
    fn install_user(root: &Path, config: &str, user: &str, uid: u32) -> Plan {
        let layout =
            crate::layout::for_install(&crate::layout::installed(root).unwrap(), user).unwrap();
        let desired = crate::render::tests::rendered_for(config, user, uid, layout.clone());
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let mut obs = observe(root, &paths, &STAGED, &layout).unwrap();
        obs.user = Some(user.to_string());
        let c = pmguard_agent::config::Config::parse(Path::new("/x.toml"), config).unwrap();
        check_shared_paths(&c, user, &obs).unwrap();
        let plan = plan_install(&desired, &obs, false, false);
        apply(&plan, root, &STAGED, false).unwrap();
        plan
    }

    fn uninstall_user(root: &Path, user: &str) -> Plan {
        let installed = crate::layout::installed(root).unwrap();
        let chosen = crate::layout::for_user(&installed, Some(user)).unwrap();
        let plan = plan_uninstall(&observe(root, &[], &STAGED, &chosen[0].layout).unwrap());
        apply(&plan, root, &STAGED, false).unwrap();
        plan
    }

    /// Installs `config` for `user` with `agent` (`None`: the package's, run in place).
    fn install_with_agent(root: &Path, config: &str, user: &str, uid: u32, agent: Option<&[u8]>) {
        let layout =
            crate::layout::for_install(&crate::layout::installed(root).unwrap(), user).unwrap();
        let c = pmguard_agent::config::Config::parse(Path::new("/x.toml"), config).unwrap();
        let settings = crate::render::Settings {
            account: crate::render::tests::account_of(user, uid),
            config_text: config.to_string(),
            agent_binary: agent.map(<[u8]>::to_vec),
            pm2: crate::pm2unit::Supervision::Startup {
                unit: format!("pm2-{user}.service"),
            },
            layout: layout.clone(),
        };
        let desired = crate::render::render(&c, &settings).unwrap();
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let obs = observe(root, &paths, &STAGED, &layout).unwrap();
        check_shared_paths(&c, user, &obs).unwrap();
        apply(
            &plan_install(&desired, &obs, false, false),
            root,
            &STAGED,
            false,
        )
        .unwrap();
    }

    /// The program `unit` starts: the last `ExecStart=` of the unit file and its drop-ins
    /// (an empty one resets), as systemd reads them.
    fn exec_start(root: &Path, unit_files: &[&str]) -> Option<String> {
        let mut exec = None;
        for f in unit_files {
            let Ok(text) = std::fs::read_to_string(root.join(f)) else {
                continue;
            };
            for l in text.lines().filter_map(|l| l.strip_prefix("ExecStart=")) {
                exec = l.split_whitespace().next().map(str::to_string);
            }
        }
        exec
    }

    #[test]
    fn no_install_changes_or_removes_the_agent_another_user_runs() {
        use crate::render::tests::{ALICE, BOB};
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
        std::fs::write(root.path().join("usr/bin/pmguard-agent"), "packaged").unwrap();
        install_with_agent(root.path(), MINIMAL, "ubuntu", 1000, None);
        install_with_agent(root.path(), BOB, "bob", 1002, None);
        let bob = [
            "etc/systemd/system/pmguard-agent@.service",
            "etc/systemd/system/pmguard-agent@bob.service.d/pmguard.conf",
        ];
        assert_eq!(
            exec_start(root.path(), &bob).as_deref(),
            Some("/usr/bin/pmguard-agent")
        );
        install_with_agent(root.path(), ALICE, "alice", 1001, Some(b"copied"));
        let alice = [
            bob[0],
            "etc/systemd/system/pmguard-agent@alice.service.d/pmguard.conf",
        ];
        assert_eq!(
            exec_start(root.path(), &alice).as_deref(),
            Some("/usr/local/bin/pmguard-agent")
        );
        assert_eq!(
            exec_start(root.path(), &bob).as_deref(),
            Some("/usr/bin/pmguard-agent"),
            "alice's install changed bob's agent"
        );
        // Bob's re-run (his doctor's view) is unchanged by alice's install.
        let desired =
            crate::render::tests::rendered_for(BOB, "bob", 1002, Layout::instance("bob").unwrap());
        let drop_in = desired
            .iter()
            .find(|f| f.path.ends_with("pmguard-agent@bob.service.d/pmguard.conf"))
            .unwrap();
        let template = desired
            .iter()
            .find(|f| f.path == Path::new(TEMPLATE_PATH))
            .unwrap();
        assert_eq!(
            std::fs::read(root.path().join(bob[0])).unwrap(),
            template.content,
            "one template for every agent choice"
        );
        assert_ne!(
            std::fs::read(root.path().join(bob[1])).unwrap(),
            drop_in.content,
            "bob runs the package's agent, not a copy"
        );
        uninstall_user(root.path(), "alice");
        assert!(!root.path().join("usr/local/bin/pmguard-agent").exists());
        let exec = exec_start(root.path(), &bob).unwrap();
        assert!(
            root.path().join(exec.trim_start_matches('/')).exists(),
            "bob's agent {exec} is gone"
        );
        // An instance from before per-install ExecStart= (its drop-in names no agent) blocks a
        // template rewrite until its own install has run.
        let drop_in = root.path().join(bob[1]);
        let old = std::fs::read_to_string(&drop_in).unwrap();
        let no_exec: String = old
            .lines()
            .filter(|l| !l.starts_with("ExecStart="))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&drop_in, &no_exec).unwrap();
        let template = root.path().join(bob[0]);
        std::fs::write(
            &template,
            "[Service]\nExecStart=/usr/bin/pmguard-agent run\n",
        )
        .unwrap();
        let desired = crate::render::tests::rendered_instance(ALICE, "alice", 1001);
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let obs = observe(
            root.path(),
            &paths,
            &STAGED,
            &Layout::instance("alice").unwrap(),
        )
        .unwrap();
        let plan = plan_install(&desired, &obs, false, false);
        assert!(
            display(&plan)
                .contains("BLOCKED: pmguard-agent@bob.service was installed by an older pmguard"),
            "{}",
            display(&plan)
        );
        install_with_agent(root.path(), BOB, "bob", 1002, None);
        assert_eq!(
            exec_start(root.path(), &bob).as_deref(),
            Some("/usr/bin/pmguard-agent")
        );
        // And the other way round: a copy bob runs stays while he uses it.
        install_with_agent(root.path(), BOB, "bob", 1002, Some(b"copied"));
        install_with_agent(root.path(), ALICE, "alice", 1001, None);
        uninstall_user(root.path(), "alice");
        assert_eq!(
            exec_start(root.path(), &bob).as_deref(),
            Some("/usr/local/bin/pmguard-agent")
        );
        assert!(root.path().join("usr/local/bin/pmguard-agent").exists());
    }

    #[test]
    fn a_first_install_cut_short_after_its_manifest_stays_the_single_user_layout() {
        use crate::render::tests::ALICE;
        let root = tempfile::tempdir().unwrap();
        let desired = rendered(MINIMAL);
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let mut obs = observe(root.path(), &paths, &STAGED, &Layout::Single).unwrap();
        obs.user = Some("ubuntu".into());
        let mut plan = plan_install(&desired, &obs, false, false);
        let manifest_at = plan
            .steps
            .iter()
            .position(
                |s| matches!(s, Step::Write { file, .. } if file.path == Path::new(MANIFEST_PATH)),
            )
            .unwrap();
        // Killed right after the manifest: no unit, so no `User=` to read.
        plan.steps.truncate(manifest_at + 1);
        apply(&plan, root.path(), &STAGED, false).unwrap();
        assert!(!root
            .path()
            .join("etc/systemd/system/pmguard-agent.service")
            .exists());
        install_user(root.path(), MINIMAL, "ubuntu", 1000);
        assert!(
            !root.path().join("etc/pmguard/users").exists(),
            "ubuntu became an instance of itself"
        );
        assert!(root
            .path()
            .join("etc/systemd/system/pmguard-agent.service")
            .exists());
        let installed = crate::layout::installed(root.path()).unwrap();
        assert_eq!(crate::layout::names(&installed), "ubuntu");
        // A manifest from before the user was recorded: the unit's User= still says.
        let mpath = root.path().join("etc/pmguard/install-manifest.json");
        let mut m = Manifest::read(&mpath).unwrap().unwrap();
        assert_eq!(m.user.as_deref(), Some("ubuntu"));
        m.user = None;
        std::fs::write(&mpath, m.to_bytes()).unwrap();
        assert_eq!(
            crate::layout::names(&crate::layout::installed(root.path()).unwrap()),
            "ubuntu"
        );
        install_user(root.path(), ALICE, "alice", 1001);
        assert_eq!(
            crate::layout::names(&crate::layout::installed(root.path()).unwrap()),
            "ubuntu, alice"
        );
    }

    #[test]
    fn an_instance_install_killed_while_writing_the_shared_binary_leaves_nothing_after_uninstall() {
        use crate::render::tests::{ALICE, BOB};
        let root = tempfile::tempdir().unwrap();
        user_files(root.path());
        let before = tree(root.path());
        install_with_agent(root.path(), MINIMAL, "ubuntu", 1000, Some(b"agent 1"));
        install_with_agent(root.path(), BOB, "bob", 1002, Some(b"agent 1"));
        // alice brings agent 2 and is killed while its temp file is being written.
        let layout = Layout::instance("alice").unwrap();
        let mut desired = crate::render::tests::rendered_instance(ALICE, "alice", 1001);
        for f in desired.iter_mut().filter(|f| f.kind == FileKind::Binary) {
            f.content = b"agent 2".to_vec();
        }
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let mut plan = plan_install(
            &desired,
            &observe(root.path(), &paths, &STAGED, &layout).unwrap(),
            false,
            false,
        );
        let binary_at = plan
            .steps
            .iter()
            .position(|s| matches!(s, Step::Write { file, .. } if file.path == Path::new(crate::layout::AGENT_PATH)))
            .unwrap();
        plan.steps.truncate(binary_at);
        apply(&plan, root.path(), &STAGED, false).unwrap();
        let tmp = root
            .path()
            .join("usr/local/bin/.pmguard-agent.pmguard-4242.tmp");
        std::fs::write(&tmp, "agent").unwrap();
        // Somebody's own dotfile beside it is not pmguard's.
        let theirs = root
            .path()
            .join("usr/local/bin/.pmguard-agent.pmguard-x.tmp");
        std::fs::write(&theirs, "mine").unwrap();
        let shown = display(&uninstall_user(root.path(), "alice"));
        assert!(shown.contains("remove /usr/local/bin/.pmguard-agent.pmguard-4242.tmp (left by an interrupted install)"), "{shown}");
        assert!(!tmp.exists());
        std::fs::remove_file(&theirs).unwrap();
        uninstall_user(root.path(), "bob");
        uninstall_user(root.path(), "ubuntu");
        assert_eq!(tree(root.path()), before);
    }

    #[test]
    fn a_second_and_third_user_become_instances_and_the_first_install_is_untouched() {
        use crate::render::tests::{ALICE, BOB};
        let root = tempfile::tempdir().unwrap();
        user_files(root.path());
        let before = tree(root.path());
        install_user(root.path(), MINIMAL, "ubuntu", 1000);
        let single = tree(root.path());
        install_user(root.path(), ALICE, "alice", 1001);
        install_user(root.path(), BOB, "bob", 1002);
        for p in [
            "etc/systemd/system/pmguard-agent@.service",
            "etc/systemd/system/pmguard-agent@alice.service.d/pmguard.conf",
            "etc/systemd/system/pmguard-agent@bob.service.d/pmguard.conf",
            "etc/pmguard/users/alice/pmguard.toml",
            "etc/pmguard/users/bob/install-manifest.json",
            "etc/cron.d/pmguard-alice",
            "etc/logrotate.d/pmguard-bob",
        ] {
            assert!(root.path().join(p).exists(), "{p}");
        }
        // The single-user install's files are exactly as they were.
        let now = tree(root.path());
        for (p, v) in &single {
            assert_eq!(now.get(p), Some(v), "{}", p.display());
        }
        // Every install re-run: nothing to do.
        for (config, user, uid) in [
            (MINIMAL, "ubuntu", 1000),
            (ALICE, "alice", 1001),
            (BOB, "bob", 1002),
        ] {
            let again = install_user(root.path(), config, user, uid);
            assert!(again.is_empty(), "{user}: {}", display(&again));
        }
        // Uninstall alice: her files go, bob's and the shared ones stay.
        let plan = uninstall_user(root.path(), "alice");
        assert!(
            display(&plan).contains("/etc/systemd/system/pmguard-agent@.service is kept: pmguard-agent@bob.service uses it too"),
            "{}",
            display(&plan)
        );
        for p in [
            "etc/systemd/system/pmguard-agent@alice.service.d",
            "etc/pmguard/users/alice",
            "etc/cron.d/pmguard-alice",
            "etc/logrotate.d/pmguard-alice",
        ] {
            assert!(!root.path().join(p).exists(), "{p} left behind");
        }
        for p in [
            "etc/systemd/system/pmguard-agent@.service",
            "usr/local/bin/pmguard-agent",
            "etc/cron.d/pmguard-bob",
            "etc/pmguard/users/bob/pmguard.toml",
        ] {
            assert!(root.path().join(p).exists(), "{p} removed with alice");
        }
        assert!(install_user(root.path(), BOB, "bob", 1002).is_empty());
        // The first install removed, then the last: the root is exactly as before.
        uninstall_user(root.path(), "ubuntu");
        assert!(root.path().join("usr/local/bin/pmguard-agent").exists());
        uninstall_user(root.path(), "bob");
        assert_eq!(tree(root.path()), before);
    }

    #[test]
    fn an_upgrade_of_a_shared_file_is_recorded_for_every_install_that_lists_it() {
        use crate::render::tests::{rendered_instance, ALICE, BOB};
        let root = tempfile::tempdir().unwrap();
        install_user(root.path(), MINIMAL, "ubuntu", 1000);
        install_user(root.path(), ALICE, "alice", 1001);
        // bob's install brings a newer agent: it replaces the one ubuntu and alice run.
        let mut desired = rendered_instance(BOB, "bob", 1002);
        let agent = desired
            .iter_mut()
            .find(|f| f.path == Path::new(crate::layout::AGENT_PATH))
            .unwrap();
        agent.content = b"\x7fELF a newer agent".to_vec();
        let layout = Layout::instance("bob").unwrap();
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let plan = plan_install(
            &desired,
            &observe(root.path(), &paths, &STAGED, &layout).unwrap(),
            false,
            false,
        );
        apply(&plan, root.path(), &STAGED, false).unwrap();
        let shown = display(&plan);
        assert!(
            shown.contains("update /etc/pmguard/install-manifest.json"),
            "{shown}"
        );
        assert!(
            shown.contains("update /etc/pmguard/users/alice/install-manifest.json"),
            "{shown}"
        );
        // Removed in any order, the newer agent goes with the last install.
        uninstall_user(root.path(), "bob");
        uninstall_user(root.path(), "alice");
        assert!(root.path().join("usr/local/bin/pmguard-agent").exists());
        uninstall_user(root.path(), "ubuntu");
        assert!(
            tree(root.path()).is_empty(),
            "{:?}",
            tree(root.path()).keys().collect::<Vec<_>>()
        );
    }

    #[test]
    fn on_a_live_systemd_a_new_shared_file_restarts_the_other_agents_that_run() {
        use crate::render::tests::{rendered_instance, ALICE, BOB};
        let root = tempfile::tempdir().unwrap();
        install_user(root.path(), MINIMAL, "ubuntu", 1000);
        install_user(root.path(), ALICE, "alice", 1001);
        let up = FakeSystemd(UnitState::Live {
            enabled: false,
            active: false,
        });
        let desired = rendered_instance(BOB, "bob", 1002);
        let layout = Layout::instance("bob").unwrap();
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let shown = display(&plan_install(
            &desired,
            &observe(root.path(), &paths, &up, &layout).unwrap(),
            false,
            false,
        ));
        // The template and agent are unchanged for bob's install: nobody else restarts.
        assert!(!shown.contains("try-restart"), "{shown}");
        assert!(
            shown.contains("systemctl enable pmguard-agent@bob.service\nsystemctl restart pmguard-agent@bob.service"),
            "{shown}"
        );
        let mut newer = desired.clone();
        for f in newer.iter_mut().filter(|f| Layout::is_shared(&f.path)) {
            f.content.extend_from_slice(b"\n# newer\n");
        }
        let shown = display(&plan_install(
            &newer,
            &observe(root.path(), &paths, &up, &layout).unwrap(),
            false,
            false,
        ));
        assert!(
            shown.contains("systemctl try-restart pmguard-agent.service\nsystemctl try-restart pmguard-agent@alice.service"),
            "{shown}"
        );
    }

    #[test]
    fn an_interrupted_instance_install_converges_and_leaves_nothing_behind() {
        use crate::render::tests::{rendered_instance, ALICE};
        let desired = rendered_instance(ALICE, "alice", 1001);
        let layout = Layout::instance("alice").unwrap();
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let steps = {
            let root = tempfile::tempdir().unwrap();
            install_user(root.path(), MINIMAL, "ubuntu", 1000);
            plan_install(
                &desired,
                &observe(root.path(), &paths, &STAGED, &layout).unwrap(),
                false,
                false,
            )
            .steps
            .len()
        };
        for cut in 1..steps {
            let root = tempfile::tempdir().unwrap();
            install_user(root.path(), MINIMAL, "ubuntu", 1000);
            let mut plan = plan_install(
                &desired,
                &observe(root.path(), &paths, &STAGED, &layout).unwrap(),
                false,
                false,
            );
            plan.steps.truncate(cut);
            apply(&plan, root.path(), &STAGED, false).unwrap();
            install_user(root.path(), ALICE, "alice", 1001);
            assert!(
                install_user(root.path(), ALICE, "alice", 1001).is_empty(),
                "cut at {cut}"
            );
            uninstall_user(root.path(), "ubuntu");
            uninstall_user(root.path(), "alice");
            assert!(
                tree(root.path()).is_empty(),
                "cut at {cut}: {:?}",
                tree(root.path()).keys().collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn a_second_agent_may_not_share_a_state_directory() {
        use crate::render::tests::ALICE;
        let root = tempfile::tempdir().unwrap();
        install_user(root.path(), MINIMAL, "ubuntu", 1000);
        install_user(root.path(), ALICE, "alice", 1001);
        let layout = Layout::instance("bob").unwrap();
        let desired = crate::render::tests::rendered_instance(ALICE, "bob", 1002);
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let obs = observe(root.path(), &paths, &STAGED, &layout).unwrap();
        let c = pmguard_agent::config::Config::parse(Path::new("/x.toml"), ALICE).unwrap();
        let err = check_shared_paths(&c, "bob", &obs).unwrap_err().to_string();
        assert!(
            err.contains("state directory /var/lib/pmguard-alice is already used by alice's agent (its state directory /var/lib/pmguard-alice)")
                && err.contains("state_dir = \"/var/lib/pmguard-bob\""),
            "{err}"
        );
    }

    /// What `install --user user` says about `config` next to the installs under `root`.
    fn shared_paths_error(root: &Path, config: &str, user: &str, uid: u32) -> Option<String> {
        let layout =
            crate::layout::for_install(&crate::layout::installed(root).unwrap(), user).unwrap();
        let desired = crate::render::tests::rendered_for(config, user, uid, layout.clone());
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let obs = observe(root, &paths, &STAGED, &layout).unwrap();
        let c = pmguard_agent::config::Config::parse(Path::new("/x.toml"), config).unwrap();
        check_shared_paths(&c, user, &obs)
            .err()
            .map(|e| e.to_string())
    }

    #[test]
    fn a_state_directory_inside_or_around_another_agents_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let cfg = |agent: &str| format!("[agent]\n{agent}\n\n[[apps]]\nname = \"web\"\n");
        install_user(
            root.path(),
            &cfg("state_dir = \"/var/lib/pmguard\""),
            "ubuntu",
            1000,
        );
        let err = shared_paths_error(
            root.path(),
            &cfg("state_dir = \"/var/lib/pmguard/alice\""),
            "alice",
            1001,
        )
        .unwrap();
        assert!(err.contains("state directory /var/lib/pmguard/alice is already used by ubuntu's agent (its state directory /var/lib/pmguard)"), "{err}");
        let err = shared_paths_error(root.path(), &cfg("state_dir = \"/var/lib/pmguard-a\"\nprometheus_textfile = \"/var/lib/pmguard/metrics/a.prom\""), "alice", 1001).unwrap();
        assert!(err.contains("Prometheus textfile directory /var/lib/pmguard/metrics is already used by ubuntu's agent"), "{err}");
        // Beside it (a name that only starts the same) is fine, and the install goes ahead.
        let alice = cfg("state_dir = \"/var/lib/pmguard-alice\"\nprometheus_textfile = \"/srv/prom/alice.prom\"");
        assert_eq!(shared_paths_error(root.path(), &alice, "alice", 1001), None);
        install_user(root.path(), &alice, "alice", 1001);
        // A state directory around alice's textfile directory: refused the other way round.
        let err =
            shared_paths_error(root.path(), &cfg("state_dir = \"/srv\""), "bob", 1002).unwrap();
        assert!(err.contains("state directory /srv is already used by alice's agent (its Prometheus textfile directory /srv/prom)"), "{err}");
    }

    #[test]
    fn a_pm2_home_of_another_install_or_of_another_account_is_refused() {
        use crate::render::tests::{account_of, ALICE, BOB};
        let root = tempfile::tempdir().unwrap();
        install_user(root.path(), ALICE, "alice", 1001);
        std::fs::create_dir_all(root.path().join("home/alice/.pm2")).unwrap();
        std::fs::create_dir_all(root.path().join("home/bob")).unwrap();
        std::os::unix::fs::symlink("../alice/.pm2", root.path().join("home/bob/link")).unwrap();
        let layout = Layout::instance("bob").unwrap();
        let desired = crate::render::tests::rendered_instance(BOB, "bob", 1002);
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let obs = observe(root.path(), &paths, &STAGED, &layout).unwrap();
        let bob = account_of("bob", 1002);
        for home in ["/home/alice/.pm2", "/home/bob/link"] {
            let err = check_pm2_home(root.path(), Path::new(home), &bob, &obs, false)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("already used by alice's agent (its PM2_HOME /home/alice/.pm2)"),
                "{home}: {err}"
            );
        }
        assert!(
            check_pm2_home(root.path(), Path::new("/home/bob/.pm2"), &bob, &obs, false).is_ok()
        );
        // Owned by whoever runs this test, not by bob (uid 1002).
        std::fs::create_dir_all(root.path().join("home/bob/.pm2")).unwrap();
        let err = check_pm2_home(root.path(), Path::new("/home/bob/.pm2"), &bob, &obs, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not by bob"), "{err}");
        let me = std::fs::metadata(root.path()).unwrap().uid();
        assert!(check_pm2_home(
            root.path(),
            Path::new("/home/bob/.pm2"),
            &account_of("bob", me),
            &obs,
            true
        )
        .is_ok());
    }

    #[test]
    fn uninstall_needs_a_user_on_a_box_with_several() {
        use crate::render::tests::ALICE;
        let root = tempfile::tempdir().unwrap();
        install_user(root.path(), MINIMAL, "ubuntu", 1000);
        install_user(root.path(), ALICE, "alice", 1001);
        let installed = crate::layout::installed(root.path()).unwrap();
        assert_eq!(crate::layout::names(&installed), "ubuntu, alice");
        let err = crate::layout::for_user(&installed, Some("carol"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("installed for: ubuntu, alice"), "{err}");
    }

    #[test]
    fn a_manifest_naming_anything_else_is_refused_and_nothing_is_deleted() {
        let root = tempfile::tempdir().unwrap();
        install(root.path(), MINIMAL, false);
        // A root-owned file outside anything pmguard installs, and a manifest pointing at it.
        std::fs::create_dir_all(root.path().join("etc/ssh")).unwrap();
        let victim = root.path().join("etc/ssh/sshd_config");
        std::fs::write(&victim, "PermitRootLogin no\n").unwrap();
        let mpath = root.path().join("etc/pmguard/install-manifest.json");
        let mut m = Manifest::read(&mpath).unwrap().unwrap();
        let hash = sha256(b"PermitRootLogin no\n");
        for evil in ["/etc/pmguard/../ssh/sshd_config", "/etc/ssh/sshd_config"] {
            let mut bad = m.clone();
            bad.files.insert(PathBuf::from(evil), hash.clone());
            std::fs::write(&mpath, bad.to_bytes()).unwrap();
            let err = observe(root.path(), &[], &STAGED, &Layout::Single)
                .unwrap_err()
                .to_string();
            assert!(err.contains("never installs"), "{evil}: {err}");
        }
        m.created_dirs.push(PathBuf::from("/etc/ssh"));
        std::fs::write(&mpath, m.to_bytes()).unwrap();
        assert!(observe(root.path(), &[], &STAGED, &Layout::Single)
            .unwrap_err()
            .to_string()
            .contains("never creates"));
        assert_eq!(std::fs::read(&victim).unwrap(), b"PermitRootLogin no\n");
    }

    #[test]
    fn a_symlinked_or_foreign_writable_parent_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join("etc/cron.d")).unwrap();
        let desired = rendered(MINIMAL);
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let err = observe(root.path(), &paths, &STAGED, &Layout::Single)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a symlink"), "{err}");
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
        std::fs::remove_file(root.path().join("etc/cron.d")).unwrap();
        dir_with_mode(&root.path().join("etc/cron.d"), 0o777);
        let err = observe(root.path(), &paths, &STAGED, &Layout::Single)
            .unwrap_err()
            .to_string();
        assert!(err.contains("chmod go-w"), "{err}");
    }

    /// Makes `dir` (and its parents) and gives it `mode`, whatever the umask.
    fn dir_with_mode(dir: &Path, mode: u32) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_sticky_world_writable_parent_is_refused_too() {
        let root = tempfile::tempdir().unwrap();
        dir_with_mode(&root.path().join("etc/cron.d"), 0o1777);
        let desired = rendered(MINIMAL);
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let err = observe(root.path(), &paths, &STAGED, &Layout::Single)
            .unwrap_err()
            .to_string();
        assert!(err.contains("etc/cron.d is owned by uid"), "{err}");
        assert!(err.contains("chmod go-w"), "{err}");
    }

    #[test]
    fn a_directory_linked_in_after_observe_is_neither_chmodded_nor_written_through() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        dir_with_mode(elsewhere.path(), 0o700);
        let desired = rendered(MINIMAL);
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let obs = observe(root.path(), &paths, &STAGED, &Layout::Single).unwrap();
        let plan = plan_install(&desired, &obs, false, false);
        // Between observe and apply: /etc made (as the root's owner, so taken), and
        // /etc/pmguard a link to a directory elsewhere.
        dir_with_mode(&root.path().join("etc"), 0o755);
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join("etc/pmguard")).unwrap();
        let err = apply(&plan, root.path(), &STAGED, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("etc/pmguard is a symlink"), "{err}");
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
        let mode = std::fs::metadata(elsewhere.path()).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o700, "chmodded through the link");
        // A directory made meanwhile that others can write into is refused the same way.
        std::fs::remove_file(root.path().join("etc/pmguard")).unwrap();
        dir_with_mode(&root.path().join("etc/pmguard"), 0o777);
        let err = apply(&plan, root.path(), &STAGED, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("chmod go-w"), "{err}");
        assert_eq!(
            std::fs::read_dir(root.path().join("etc/pmguard"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn directories_get_their_mode_whatever_the_umask_and_drift_is_put_back() {
        let root = tempfile::tempdir().unwrap();
        // Restored below (tests in this binary make no files that depend on it meanwhile
        // beyond their explicit modes).
        use rustix::fs::Mode;
        let old = rustix::process::umask(Mode::from_raw_mode(0o077));
        install(root.path(), MINIMAL, false);
        rustix::process::umask(old);
        let dir = root.path().join("etc/pmguard");
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o755);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let plan = replan(root.path(), MINIMAL);
        assert!(
            display(&plan).contains("fix mode of directory /etc/pmguard: 0700 -> 0755"),
            "{}",
            display(&plan)
        );
        apply(&plan, root.path(), &STAGED, false).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o755);
        assert!(replan(root.path(), MINIMAL).is_empty());
    }

    #[test]
    fn uninstall_removes_pmguards_own_state_dir_and_nothing_through_its_links() {
        let root = tempfile::tempdir().unwrap();
        install(root.path(), FULL, false);
        let state = root.path().join("var/lib/pmguard");
        std::fs::create_dir_all(state.join("spool")).unwrap();
        std::fs::write(state.join("events.jsonl"), "{}\n").unwrap();
        // A link the PM2 user could plant: its target must survive.
        let victim = root.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, state.join("spool/link")).unwrap();
        let plan = plan_uninstall(&observe(root.path(), &[], &STAGED, &Layout::Single).unwrap());
        assert!(display(&plan).contains("remove the agent's state /var/lib/pmguard"));
        apply(&plan, root.path(), &STAGED, false).unwrap();
        assert!(!state.exists());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn uninstall_keeps_a_state_dir_another_install_uses() {
        use crate::render::tests::ALICE;
        let root = tempfile::tempdir().unwrap();
        install_user(root.path(), MINIMAL, "ubuntu", 1000);
        install_user(root.path(), ALICE, "alice", 1001);
        let alice = root.path().join("var/lib/pmguard-alice");
        std::fs::create_dir_all(&alice).unwrap();
        std::fs::write(alice.join("events.jsonl"), "{}\n").unwrap();
        // ubuntu's config edited by hand since install, to alice's state directory.
        std::fs::write(
            root.path().join("etc/pmguard/pmguard.toml"),
            format!("[agent]\nstate_dir = \"/var/lib/pmguard-alice\"\n{MINIMAL}"),
        )
        .unwrap();
        let plan = uninstall_user(root.path(), "ubuntu");
        assert!(
            display(&plan).contains("/var/lib/pmguard-alice is kept: alice's agent uses it too"),
            "{}",
            display(&plan)
        );
        assert!(alice.join("events.jsonl").exists());
    }

    #[test]
    fn a_state_dir_outside_pmguards_own_is_kept() {
        let root = tempfile::tempdir().unwrap();
        install(root.path(), crate::render::tests::MULTI, false);
        let state = root.path().join("srv/pmguard/state");
        std::fs::create_dir_all(&state).unwrap();
        let plan = plan_uninstall(&observe(root.path(), &[], &STAGED, &Layout::Single).unwrap());
        apply(&plan, root.path(), &STAGED, false).unwrap();
        assert!(
            state.exists(),
            "ReadWritePaths= state is the user's to remove"
        );
    }

    #[test]
    fn uninstall_keeps_any_file_changed_since_install() {
        let root = tempfile::tempdir().unwrap();
        install(root.path(), MINIMAL, false);
        let cron = root.path().join("etc/cron.d/pmguard");
        std::fs::write(&cron, "# mine now\n").unwrap();
        let plan = plan_uninstall(&observe(root.path(), &[], &STAGED, &Layout::Single).unwrap());
        apply(&plan, root.path(), &STAGED, false).unwrap();
        assert_eq!(std::fs::read(&cron).unwrap(), b"# mine now\n");
        assert!(display(&plan).contains("/etc/cron.d/pmguard was changed since install"));
    }

    #[test]
    fn apply_then_plan_again_is_empty_and_touches_nothing() {
        let root = tempfile::tempdir().unwrap();
        let first = install(root.path(), FULL, false);
        assert!(!first.is_empty());
        let unit = root.path().join("etc/systemd/system/pmguard-agent.service");
        let mtime = std::fs::metadata(&unit).unwrap().modified().unwrap();
        let again = replan(root.path(), FULL);
        assert!(again.is_empty(), "{}", display(&again));
        assert!(display(&again).starts_with("Nothing to do.\n"));
        install(root.path(), FULL, false);
        assert_eq!(std::fs::metadata(&unit).unwrap().modified().unwrap(), mtime);
    }

    #[test]
    fn a_hand_edited_unit_is_put_back_with_the_diff_shown() {
        let root = tempfile::tempdir().unwrap();
        install(root.path(), MINIMAL, false);
        let unit = root.path().join("etc/systemd/system/pmguard-agent.service");
        let original = std::fs::read_to_string(&unit).unwrap();
        std::fs::write(&unit, original.replace("Restart=on-failure", "Restart=no")).unwrap();
        let plan = replan(root.path(), MINIMAL);
        let shown = display(&plan);
        assert!(shown.contains(&format!("update {UNIT_PATH}")), "{shown}");
        assert!(
            shown.contains("-Restart=no") && shown.contains("+Restart=on-failure"),
            "{shown}"
        );
        install(root.path(), MINIMAL, false);
        assert_eq!(std::fs::read_to_string(&unit).unwrap(), original);
    }

    #[test]
    fn a_mode_change_is_put_back() {
        let root = tempfile::tempdir().unwrap();
        install(root.path(), MINIMAL, false);
        let cron = root.path().join("etc/cron.d/pmguard");
        std::fs::set_permissions(&cron, std::fs::Permissions::from_mode(0o666)).unwrap();
        let plan = replan(root.path(), MINIMAL);
        assert!(
            display(&plan).contains("fix mode/owner of /etc/cron.d/pmguard: 0666"),
            "{}",
            display(&plan)
        );
        install(root.path(), MINIMAL, false);
        assert_eq!(std::fs::metadata(&cron).unwrap().mode() & 0o777, 0o644);
    }

    #[test]
    fn an_edited_config_needs_force() {
        let root = tempfile::tempdir().unwrap();
        install(root.path(), MINIMAL, false);
        let cfg = root.path().join("etc/pmguard/pmguard.toml");
        std::fs::write(&cfg, format!("{MINIMAL}max_retries = 5\n")).unwrap();
        let plan = install(root.path(), FULL, false);
        assert_eq!(plan.blocked.len(), 1);
        let shown = display(&plan);
        assert!(
            shown.contains(&format!("BLOCKED: {CONFIG_PATH} was edited")),
            "{shown}"
        );
        assert!(shown.contains("-max_retries = 5"), "{shown}");
        assert!(
            std::fs::read_to_string(&cfg)
                .unwrap()
                .contains("max_retries = 5"),
            "nothing written"
        );
        let plan = install(root.path(), FULL, true);
        assert!(plan.blocked.is_empty());
        assert!(std::fs::read_to_string(&cfg).unwrap().contains("[aws]"));
    }

    #[test]
    fn uninstall_leaves_the_root_exactly_as_before() {
        let root = tempfile::tempdir().unwrap();
        user_files(root.path());
        let before = tree(root.path());
        install(root.path(), FULL, false);
        assert_ne!(tree(root.path()), before);
        let obs = observe(root.path(), &[], &STAGED, &Layout::Single).unwrap();
        let plan = plan_uninstall(&obs);
        apply(&plan, root.path(), &STAGED, false).unwrap();
        assert_eq!(tree(root.path()), before);
        let again = plan_uninstall(&observe(root.path(), &[], &STAGED, &Layout::Single).unwrap());
        assert!(again.is_empty());
    }

    #[test]
    fn uninstall_keeps_an_edited_config() {
        let root = tempfile::tempdir().unwrap();
        install(root.path(), MINIMAL, false);
        let cfg = root.path().join("etc/pmguard/pmguard.toml");
        std::fs::write(&cfg, "# mine\n").unwrap();
        let plan = plan_uninstall(&observe(root.path(), &[], &STAGED, &Layout::Single).unwrap());
        apply(&plan, root.path(), &STAGED, false).unwrap();
        assert_eq!(std::fs::read_to_string(&cfg).unwrap(), "# mine\n");
        assert!(!root
            .path()
            .join("etc/systemd/system/pmguard-agent.service")
            .exists());
    }

    #[test]
    fn an_interrupted_install_converges() {
        for cut in 1..14 {
            let root = tempfile::tempdir().unwrap();
            let desired = rendered(FULL);
            let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
            let mut plan = plan_install(
                &desired,
                &observe(root.path(), &paths, &STAGED, &Layout::Single).unwrap(),
                false,
                false,
            );
            let manifest_at = plan
                .steps
                .iter()
                .position(|s| matches!(s, Step::Write { file, .. } if file.path == Path::new(MANIFEST_PATH)))
                .unwrap();
            plan.steps.truncate(cut);
            apply(&plan, root.path(), &STAGED, false).unwrap();
            install(root.path(), FULL, false);
            assert!(replan(root.path(), FULL).is_empty(), "cut at {cut}");
            let plan =
                plan_uninstall(&observe(root.path(), &[], &STAGED, &Layout::Single).unwrap());
            apply(&plan, root.path(), &STAGED, false).unwrap();
            // Once the manifest is written (step 3 on an empty root), nothing is left behind.
            if cut > manifest_at {
                assert!(
                    tree(root.path()).is_empty(),
                    "cut at {cut}: {:?}",
                    tree(root.path()).keys().collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn removing_aws_removes_the_iam_policy() {
        let root = tempfile::tempdir().unwrap();
        install(root.path(), FULL, true);
        assert!(root
            .path()
            .join("etc/pmguard/iam-agent-policy.json")
            .exists());
        assert!(root
            .path()
            .join("etc/pmguard/iam-admin-policy.json")
            .exists());
        install(root.path(), MINIMAL, true);
        assert!(!root
            .path()
            .join("etc/pmguard/iam-agent-policy.json")
            .exists());
        assert!(!root
            .path()
            .join("etc/pmguard/iam-admin-policy.json")
            .exists());
        assert!(replan(root.path(), MINIMAL).is_empty());
    }

    struct FakeSystemd(UnitState);
    impl Systemd for FakeSystemd {
        fn state(&self, _: &str) -> UnitState {
            self.0.clone()
        }
        fn run(&self, _: &[&str]) -> Result<(), crate::Error> {
            Ok(())
        }
    }

    #[test]
    fn without_systemd_the_plan_says_which_steps_were_skipped() {
        let root = tempfile::tempdir().unwrap();
        let desired = rendered(MINIMAL);
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let sd = FakeSystemd(UnitState::NoSystemd("PID 1 is process_api".into()));
        let plan = plan_install(
            &desired,
            &observe(root.path(), &paths, &sd, &Layout::Single).unwrap(),
            false,
            false,
        );
        let shown = display(&plan);
        assert!(
            !shown.lines().any(|l| l.starts_with("systemctl ")),
            "{shown}"
        );
        assert!(shown.contains("systemd is not running here (PID 1 is process_api): skipped daemon-reload, enable and start"), "{shown}");
    }

    #[test]
    fn on_a_live_systemd_changes_restart_the_agent_and_nothing_else_does() {
        let root = tempfile::tempdir().unwrap();
        install(root.path(), MINIMAL, false);
        let desired = rendered(MINIMAL);
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let up = FakeSystemd(UnitState::Live {
            enabled: true,
            active: true,
        });
        assert!(plan_install(
            &desired,
            &observe(root.path(), &paths, &up, &Layout::Single).unwrap(),
            false,
            false
        )
        .is_empty());
        let down = FakeSystemd(UnitState::Live {
            enabled: false,
            active: false,
        });
        let shown = display(&plan_install(
            &desired,
            &observe(root.path(), &paths, &down, &Layout::Single).unwrap(),
            false,
            false,
        ));
        assert!(
            shown.contains(
                "systemctl enable pmguard-agent.service\nsystemctl restart pmguard-agent.service"
            ),
            "{shown}"
        );
        let desired = rendered(FULL);
        let shown = display(&plan_install(
            &desired,
            &observe(root.path(), &paths, &up, &Layout::Single).unwrap(),
            true,
            false,
        ));
        assert!(
            shown.contains("systemctl daemon-reload") && shown.contains("systemctl restart"),
            "{shown}"
        );
    }

    #[test]
    fn plan_display_snapshot() {
        let root = tempfile::tempdir().unwrap();
        let desired = rendered(MINIMAL);
        let paths: Vec<PathBuf> = desired.iter().map(|f| f.path.clone()).collect();
        let plan = plan_install(
            &desired,
            &observe(root.path(), &paths, &STAGED, &Layout::Single).unwrap(),
            false,
            false,
        );
        insta::assert_snapshot!("fresh_install_plan", display(&plan));
    }
}
