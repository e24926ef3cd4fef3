//! The agent's pulse: the heartbeat, `status.json`, readiness and systemd's watchdog, driven by
//! the watch loop's own wake-ups.
//!
//! The main thread used to wake every 500 ms for this: two of the agent's ~4.5 wake-ups a
//! second and about a third of its own CPU at one app (BENCHMARKS.md, "Cost to the box, round
//! 3"). The watch loop wakes at least once a second anyway (its poll is capped at 1 s), so after
//! each of its rounds it calls `on_round`: at most every `LOOK_MS` that looks at `pauses.json`
//! (one stat), and once a beat is due it writes the 80-byte heartbeat line in place. Anything
//! larger (`status.json`, the Prometheus textfile, `READY=1`) it leaves to the main thread,
//! which it wakes with `ToMain::Status`, so a slow disk never delays a probe by more than a
//! `pwrite`. The main thread itself keeps a slow tick (`main_tick`) for pause expiry, reviving
//! a dead loop and, should the loop stop beating, the same beat.
//!
//! Invariants (as before the move): the heartbeat and `WATCHDOG=1` are refreshed only while
//! every app keeps its promised schedule (`Progress::due`), so a wedged agent looks dead to
//! systemd and to the backup check; a beat is withheld while `status.json` cannot be written;
//! a significant change or a pause is in `status.json` within one beat (or `LOOK_MS` + one
//! round for a pause); without the watch below, `status.json` is never older than
//! `STATUS_REFRESH_MS` plus a beat, and with it, never older than `ASK_MIN_MS` plus a beat
//! for a reader that waits for its answer (`StateDir::read_status_fresh`), and
//! `STATUS_QUIET_REFRESH_MS` plus a beat for one that reads the file directly.
//!
//! The state directory's watch (`sys::dirwatch`, polled by the watch loop beside its probes)
//! replaces two of those costs when the kernel grants it: a pause is noticed when `pauses.json`
//! is replaced, not by a stat every `LOOK_MS`; and `status.json`, rewritten every 5 s for
//! readers who might look, is rewritten when someone opens it instead (at most once per
//! `ASK_MIN_MS`; `StateDir::read_status_fresh` waits for it), on a significant change as
//! before, and every `STATUS_QUIET_REFRESH_MS` for readers that cannot wait (with a Prometheus
//! textfile, whose reader never opens status.json, every `STATUS_REFRESH_MS` as before). Without
//! the watch, or once it ends, everything is as described above.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use crate::clock::{self, Mono};
use crate::config::Config;
use crate::report::pauses::PAUSES_FILE_C;
use crate::report::prometheus::{self, Textfile};
use crate::report::state::{
    Beat, HeartbeatFile, StateDir, StatusFile, ASK_MIN_MS, STATUS_FILE_C, STATUS_QUIET_REFRESH_MS,
    STATUS_REFRESH_MS,
};
use crate::runtime::shared::{Progress, Shared};
use crate::sync::lock;
use crate::sys::dirwatch::DirWatch;
use crate::sys::notify::Notifier;

/// How often at most the watch loop looks whether `pauses.json` changed: `pause` waits up to
/// 5 s to see its pause applied in `status.json`.
const LOOK_MS: u64 = 500;

/// How often a heartbeat file that could not be opened or written is tried again (one open;
/// the failure is logged once).
const BEAT_FILE_RETRY_MS: u64 = 5_000;

/// The main thread's tick while the directory is watched: what it does on its own then is
/// reviving a watch loop that died (unwinding builds only; a release build aborts and systemd
/// starts it again) and a beat should the loop not.
const MAIN_TICK_MS: u64 = 30_000;

/// After the directory watch woke the loop, it is not polled again for this long: a reader
/// opening `status.json` in a loop wakes the agent at most 10 times a second, not once per
/// open (a pause waits that much longer at most).
const WATCH_REST_MS: u64 = 100;

/// Why the pulse wakes the main thread.
pub enum ToMain {
    Signal(crate::sys::signals::Sig),
    /// `status.json` is due (a change, a pause, the refresh, the first beat): write it, then beat.
    Status,
}

/// The `[[notify]]` sinks' counters, read at each beat (they are part of `status.json`).
pub type NotifyBoard = Box<dyn Fn() -> crate::notify::Board + Send>;

pub struct Pulse {
    shared: Arc<Shared>,
    notifier: Notifier,
    /// `Mono` before which `on_round` has nothing to do: its fast path, taken by most of the
    /// loop's wake-ups at 100 apps.
    next_at: AtomicU64,
    wake_main: Mutex<Sender<ToMain>>,
    inner: Mutex<Inner>,
    /// The state directory's watch; `None` when the kernel refused it.
    dir: Option<DirWatch>,
    /// The watch works (false without one, or once it ended).
    watching: AtomicBool,
    /// Someone opened `status.json` since the last write.
    asked: AtomicBool,
    /// `pauses.json` was replaced or removed since the last look.
    pauses_changed: AtomicBool,
    /// `Mono` before which the watch is not polled (`WATCH_REST_MS`).
    watch_rest: AtomicU64,
    /// The watched directory is no longer at the state directory's path: the heartbeat file
    /// must be opened again there (taken under `inner`'s lock).
    dir_lost: AtomicBool,
}

/// What the beats share between the two threads.
pub struct Inner {
    /// Every app's promise to report (the main thread adds and removes them on reload).
    pub progress: BTreeMap<String, Arc<Progress>>,
    /// The heartbeat's period: the shortest check period, 1-5 s (see `heartbeat_every`).
    every_ms: u64,
    ready: bool,
    wedged_reported: bool,
    last_ping: Mono,
    last_beat: Mono,
    last_look: Mono,
    /// When the watch loop last asked the main thread for `status.json` (at most once a beat,
    /// so a disk that refuses it is not tried at every round).
    last_ask: Mono,
    status: StatusWrites,
    textfile: Option<Textfile>,
    notify: Option<NotifyBoard>,
    /// This process's id, for the heartbeat line (getpid(2) is not cached by libc).
    pid: u32,
}

/// When `status.json` was last rewritten, and what it said then (see `report::state`).
#[derive(Debug, Default)]
struct StatusWrites {
    /// The in-place heartbeat; `None` until opened, or after it failed (then every beat
    /// rewrites `status.json`, as before the heartbeat file existed).
    beat_file: Option<HeartbeatFile>,
    /// When opening or writing the heartbeat file last failed (`None`: it never did, or it was
    /// opened since). It is tried again every `BEAT_FILE_RETRY_MS`, so a directory that was
    /// briefly missing (moved away, made again) gets its heartbeat file back.
    beat_file_failed: Option<Mono>,
    /// A heartbeat file failure was logged; again only after a beat has been written since.
    beat_file_warned: bool,
    last_write: Mono,
    last_print: u64,
    /// A pause or reload changed what `status.json` must say, or its last write failed: write
    /// it at the next beat.
    force: bool,
    /// Someone opened `status.json`: a new one is due if the last is `ASK_MIN_MS` old.
    asked: bool,
    /// Readers can ask (the directory is watched): the quiet refresh applies.
    watched: bool,
}

impl Pulse {
    pub fn new(
        shared: Arc<Shared>,
        config: &Config,
        notifier: Notifier,
        wake_main: Sender<ToMain>,
        notify: Option<NotifyBoard>,
    ) -> Pulse {
        let dir = match DirWatch::new(&shared.state.dir, STATUS_FILE_C, PAUSES_FILE_C) {
            Ok(w) => Some(w),
            Err(error) => {
                tracing::warn!(message = "Cannot watch the state directory (inotify); rewriting status.json every 5 s and looking for pauses every 500 ms instead.", path = %shared.state.dir.display(), %error);
                None
            }
        };
        Pulse {
            watching: AtomicBool::new(dir.is_some()),
            dir,
            asked: AtomicBool::new(false),
            pauses_changed: AtomicBool::new(false),
            watch_rest: AtomicU64::new(0),
            dir_lost: AtomicBool::new(false),
            shared,
            notifier,
            next_at: AtomicU64::new(0),
            wake_main: Mutex::new(wake_main),
            inner: Mutex::new(Inner {
                progress: BTreeMap::new(),
                every_ms: heartbeat_every(config),
                ready: false,
                wedged_reported: false,
                last_ping: 0,
                last_beat: 0,
                last_look: 0,
                last_ask: 0,
                status: StatusWrites::default(),
                textfile: config
                    .agent
                    .prometheus_textfile
                    .as_deref()
                    .map(Textfile::new),
                notify,
                pid: std::process::id(),
            }),
        }
    }

    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// The state directory's watch, for the watch loop to poll beside its probes (`on_watch`
    /// when it is readable): `Ok` with the fd, or `Err` with the `Mono` until which it rests
    /// (the loop wakes then to poll it again); `Ok(None)` without a watch.
    pub fn watch_fd(&self, now: Mono) -> Result<Option<BorrowedFd<'_>>, Mono> {
        let Some(dir) = self.dir.as_ref() else {
            return Ok(None);
        };
        if !self.watching.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let rest = self.watch_rest.load(Ordering::Relaxed);
        if now < rest {
            return Err(rest);
        }
        Ok(Some(dir.fd()))
    }

    /// The watch is readable: notes what it saw for the next `on_round` (the same round).
    pub fn on_watch(&self, now: Mono) {
        let Some(dir) = &self.dir else {
            return;
        };
        self.watch_rest
            .store(now + WATCH_REST_MS, Ordering::Relaxed);
        let seen = dir.take();
        if seen.opened {
            self.asked.store(true, Ordering::Relaxed);
        }
        if seen.changed {
            self.pauses_changed.store(true, Ordering::Relaxed);
        }
        if seen.gone {
            self.lose_dir();
        }
        self.next_at.store(0, Ordering::Relaxed);
    }

    /// The watched directory was moved, removed or unmounted, or another one now has its path:
    /// back to looking by path (status.json every 5 s, a stat for pauses every 500 ms), and the
    /// heartbeat file opened again at the path, so readers of the new directory see a live
    /// agent.
    fn lose_dir(&self) {
        if self.watching.swap(false, Ordering::Relaxed) {
            tracing::warn!(message = "The state directory is no longer the one watched (moved, removed or unmounted); rewriting status.json every 5 s and looking for pauses every 500 ms from now on.", path = %self.shared.state.dir.display());
            self.pauses_changed.store(true, Ordering::Relaxed);
            self.dir_lost.store(true, Ordering::Relaxed);
            self.next_at.store(0, Ordering::Relaxed);
        }
    }

    /// Under `inner`'s lock: after `lose_dir`, the next beat writes status.json and the
    /// heartbeat into the directory now at the path.
    fn take_dir_loss(&self, g: &mut Inner) {
        if self.dir_lost.swap(false, Ordering::Relaxed) {
            g.status.beat_file = None;
            g.status.beat_file_failed = None;
            g.status.force = true;
        }
    }

    /// The shared part, for the main thread (reload changes `progress`).
    pub fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// A reload: the heartbeat's period may have changed, and `status.json` says the new config.
    pub fn reconfigure(&self, config: &Config) {
        let mut g = lock(&self.inner);
        g.every_ms = heartbeat_every(config);
        g.status.force = true;
        self.next_at.store(0, Ordering::Relaxed);
    }

    /// The main thread's slow tick (the daemon also wakes it at a pause's deadline): at most
    /// `STATUS_REFRESH_MS` and a second without the directory watch (the main thread then
    /// notices a pause's change and writes `status.json` should the loop not ask), `MAIN_TICK_MS`
    /// with it (the watch loop asks for `status.json` when due and reports pauses itself), and a
    /// quarter of the watchdog's period.
    pub fn main_tick(&self) -> u64 {
        let tick = if self.watching.load(Ordering::Relaxed) {
            MAIN_TICK_MS
        } else {
            STATUS_REFRESH_MS + 1_000
        };
        match self.notifier.watchdog {
            // `watchdog` is half of WATCHDOG_USEC already.
            Some(half) => tick.min((half.as_millis() as u64 / 2).max(100)),
            None => tick,
        }
    }

    /// Called by the watch loop after each of its rounds. Never blocks on the main thread: if
    /// it holds the lock (writing `status.json`), this round leaves the beat to it.
    pub fn on_round(&self, now: Mono) {
        if now < self.next_at.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut g) = self.inner.try_lock() else {
            return;
        };
        let g = &mut *g;
        self.take_dir_loss(g);
        let watching = self.watching.load(Ordering::Relaxed);
        let look = if watching {
            self.pauses_changed.swap(false, Ordering::Relaxed)
        } else {
            now.saturating_sub(g.last_look) >= LOOK_MS
        };
        if look {
            g.last_look = now;
            if crate::runtime::maintenance::refresh(&self.shared) {
                g.status.force = true;
            }
        }
        g.status.watched = watching;
        g.status.asked |= self.asked.swap(false, Ordering::Relaxed);
        let beat_at = g.last_beat + beat_spacing(g.every_ms);
        let look_at = if watching {
            u64::MAX
        } else {
            g.last_look + LOOK_MS
        };
        self.next_at.store(beat_at.min(look_at), Ordering::Relaxed);
        if !g.status.force && !g.status.asked && now < beat_at {
            return;
        }
        if !g.on_schedule(now) || !g.all_checked() {
            return;
        }
        if g.needs_status(now, &self.shared) {
            if g.last_ask == 0 || now.saturating_sub(g.last_ask) >= g.every_ms {
                g.last_ask = now;
                let _ = lock(&self.wake_main).send(ToMain::Status);
            }
            // On schedule: systemd hears so even while the disk refuses status.json.
            g.watchdog(now, &self.notifier);
            return;
        }
        g.beat_line(now, &self.shared);
        g.watchdog(now, &self.notifier);
    }

    /// At a clean stop, once the watch loop has ended: the final counts and states in
    /// `status.json` for whoever looks afterwards (nobody can ask any more, so it says
    /// `fresh_on_read: false`). Its heartbeat stays the last beat's: the stopped agent does
    /// not look alive any longer than without this write.
    pub fn final_status(&self) {
        let mut g = lock(&self.inner);
        let g = &mut *g;
        if !g.ready || g.last_beat == 0 {
            return;
        }
        let (last_beat, notify) = (g.last_beat, g.board());
        g.write_file(&self.shared, false, last_beat, notify);
    }

    /// The main thread's beat: after its tick, a reload, a pause change, or when the watch loop
    /// asked for `status.json`. Writes it when due, then the heartbeat.
    pub fn main_beat(&self, now: Mono, force: bool) {
        // The kernel says nothing of a directory removed while the agent's files in it are
        // open: one stat per main tick does.
        if let Some(dir) = self.dir.as_ref() {
            if self.watching.load(Ordering::Relaxed) && !dir.still_at(&self.shared.state.dir) {
                self.lose_dir();
            }
        }
        let mut g = lock(&self.inner);
        let g = &mut *g;
        self.take_dir_loss(g);
        g.status.watched = self.watching.load(Ordering::Relaxed);
        if force {
            g.status.force = true;
            g.last_beat = 0;
        }
        g.status.asked |= self.asked.swap(false, Ordering::Relaxed);
        if !g.on_schedule(now) || !g.all_checked() {
            return;
        }
        if g.needs_status(now, &self.shared) {
            if g.write_status(now, &self.shared) {
                // Asked and answered: the loop may ask again at once. After a failure it asks
                // at most once a beat.
                g.last_ask = 0;
                g.beat_line(now, &self.shared);
            }
        } else if now >= g.last_beat + beat_spacing(g.every_ms) {
            g.beat_line(now, &self.shared);
        }
        // READY=1 and the watchdog go on while status.json cannot be written (a full or
        // read-only disk): only a wedged agent must look dead to systemd, and killing the agent
        // would stop the watching that matters most then. The heartbeat line is withheld, so the
        // backup check sees the stale status for what it is.
        if !g.ready {
            g.ready = true;
            self.notifier.send("READY=1");
            self.notifier
                .send(&format!("STATUS=Watching {} app(s).", g.progress.len()));
        }
        g.watchdog(now, &self.notifier);
        self.next_at.store(0, Ordering::Relaxed);
    }
}

/// Beats land once per period: a beat is due half a second early rather than a round late.
fn beat_spacing(every_ms: u64) -> u64 {
    every_ms.saturating_sub(500)
}

impl Inner {
    /// Whether every app kept its promise to report; a broken promise withholds the heartbeat
    /// and the watchdog ping, so systemd restarts a wedged agent.
    fn on_schedule(&mut self, now: Mono) -> bool {
        let wedged: Vec<&String> = self
            .progress
            .iter()
            .filter(|(_, p)| {
                let due = p.due.load(Ordering::Relaxed);
                due != 0 && now > due
            })
            .map(|(n, _)| n)
            .collect();
        if wedged.is_empty() {
            self.wedged_reported = false;
            return true;
        }
        if !self.wedged_reported {
            tracing::error!(message = "An app missed its schedule; withholding the heartbeat.", app = ?wedged);
            self.wedged_reported = true;
        }
        false
    }

    /// Nothing beats before every app was checked once (`READY=1` waits for it too).
    fn all_checked(&self) -> bool {
        self.progress
            .values()
            .all(|p| p.checks.load(Ordering::Relaxed) > 0)
    }

    fn board(&self) -> crate::notify::Board {
        self.notify.as_ref().map(|f| f()).unwrap_or_default()
    }

    /// Whether the next beat must rewrite `status.json`: not ready yet, forced, due for its
    /// refresh, no heartbeat file, or something a person acts on changed.
    fn needs_status(&mut self, now: Mono, shared: &Shared) -> bool {
        let st = &mut self.status;
        let age = now.saturating_sub(st.last_write);
        if st.asked && age < ASK_MIN_MS {
            // What the reader opened is young enough: it reads that one.
            st.asked = false;
        }
        let refresh = if st.watched && self.textfile.is_none() {
            STATUS_QUIET_REFRESH_MS
        } else {
            STATUS_REFRESH_MS
        };
        if !self.ready || st.force || st.asked || st.beat_file.is_none() || age >= refresh {
            return true;
        }
        let last = st.last_print;
        fingerprint(shared, &self.board()) != last
    }

    /// `status.json` (and the Prometheus textfile). Returns whether it was written; a status
    /// that cannot be written (a full disk) is tried again at every beat, and meanwhile nothing
    /// beats: a fresh heartbeat over a stale status.json would make `status` and the backup
    /// check trust states that are no longer true.
    fn write_status(&mut self, now: Mono, shared: &Shared) -> bool {
        let retry = self
            .status
            .beat_file_failed
            .is_none_or(|at| now.saturating_sub(at) >= BEAT_FILE_RETRY_MS);
        if self.status.beat_file.is_none() && retry {
            match shared.state.open_heartbeat() {
                Ok(f) => {
                    self.status.beat_file = Some(f);
                    self.status.beat_file_failed = None;
                }
                Err(error) => {
                    if !self.status.beat_file_warned {
                        tracing::warn!(message = "Cannot open the heartbeat file; rewriting status.json at every beat instead.", path = %shared.state.dir.display(), %error);
                        self.status.beat_file_warned = true;
                    }
                    self.status.beat_file_failed = Some(now);
                }
            }
        }
        let notify = self.board();
        let print = fingerprint(shared, &notify);
        let watched = self.status.watched;
        let written = self.write_file(shared, watched, clock::mono_now(), notify);
        self.status.last_write = now;
        self.status.last_print = print;
        self.status.force = !written;
        // Answered; after a failure the next try answers it (the heartbeat is withheld meanwhile).
        self.status.asked &= !written;
        written
    }

    /// The one-line heartbeat, in place. Without a heartbeat file, `status.json` again.
    fn beat_line(&mut self, now: Mono, shared: &Shared) {
        self.last_beat = now;
        // The next flush to CloudWatch carries an AgentHeartbeat.
        if let Some(r) = &shared.recorder {
            r.alive();
        }
        let beat = Beat {
            pid: self.pid,
            boot_epoch: clock::boot_epoch(),
            heartbeat: clock::mono_now(),
            interval_ms: self.every_ms,
        };
        let failed = match self.status.beat_file.as_ref().map(|f| f.beat(&beat)) {
            Some(Err(error)) => {
                // Tried again every BEAT_FILE_RETRY_MS: said once, not at every try.
                if !self.status.beat_file_warned {
                    tracing::warn!(message = "Cannot write the heartbeat file; rewriting status.json at every beat instead.", path = %shared.state.dir.display(), %error);
                    self.status.beat_file_warned = true;
                }
                true
            }
            Some(Ok(())) => {
                self.status.beat_file_warned = false;
                false
            }
            None => false,
        };
        if failed {
            self.status.beat_file = None;
            self.status.beat_file_failed = Some(now);
            let (watched, notify) = (self.status.watched, self.board());
            self.write_file(shared, watched, clock::mono_now(), notify);
        }
    }

    /// `status.json` (and the textfile) as the board stands, with this heartbeat and these
    /// sink counters; whether it was written.
    fn write_file(
        &mut self,
        shared: &Shared,
        fresh_on_read: bool,
        heartbeat: Mono,
        notify: crate::notify::Board,
    ) -> bool {
        write_heartbeat(
            shared,
            self.every_ms,
            fresh_on_read,
            heartbeat,
            self.textfile.as_mut(),
            notify,
        )
    }

    fn watchdog(&mut self, now: Mono, notifier: &Notifier) {
        if let Some(every) = notifier.watchdog {
            if now.saturating_sub(self.last_ping) >= every.as_millis() as u64 / 2 {
                notifier.send("WATCHDOG=1");
                self.last_ping = now;
            }
        }
    }
}

/// What in the board a person or a script acts on: a change is written at the next beat. The
/// volatile measurements (latency, CPU, memory, probe history, check counts) are left out.
fn fingerprint(shared: &Shared, notify: &crate::notify::Board) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    // A notify sink's counters: an alert queued, delivered, dropped or failing shows at once.
    notify.lost.hash(&mut h);
    for n in &notify.sinks {
        (n.queued, n.delivered, n.dropped, n.held_back, &n.last_error).hash(&mut h);
    }
    // The pauses applied: `pause` waits to see its revision.
    crate::runtime::maintenance::applied_revision(shared).hash(&mut h);
    for a in lock(&shared.board).values() {
        (
            &a.name,
            a.health.as_str(),
            a.failures,
            a.max_retries,
            &a.note,
        )
            .hash(&mut h);
        for i in &a.instances {
            (i.pm_id, i.pid, &i.status, i.restart_time).hash(&mut h);
        }
        (a.restarts.len(), a.restarts.back().map(|r| r.ts_ms)).hash(&mut h);
    }
    h.finish()
}

/// The heartbeat's period: the shortest check period, 1 s to 5 s.
pub fn heartbeat_every(config: &Config) -> u64 {
    let shortest = config
        .apps
        .iter()
        .map(|a| a.interval.min(a.retry_interval).as_millis() as u64)
        .min()
        .unwrap_or(10_000);
    shortest.clamp(1_000, 5_000)
}

/// `status.json`, and with `prometheus_textfile` the same state for node_exporter: both encoded
/// under the board's lock from one snapshot, written after it is released.
fn write_heartbeat(
    shared: &Shared,
    interval_ms: u64,
    fresh_on_read: bool,
    heartbeat: Mono,
    textfile: Option<&mut Textfile>,
    notify: crate::notify::Board,
) -> bool {
    // The heartbeat's own cadence, not the longest app interval: one app at `1h` must not make
    // the backup check trust a dead daemon for three hours.
    let pauses_revision = crate::runtime::maintenance::applied_revision(shared);
    let (data, prom) = {
        let mut board = lock(&shared.board);
        for a in board.values_mut() {
            a.paused = shared.pause_of(&a.name);
        }
        let status = StatusFile {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            boot_epoch: clock::boot_epoch(),
            heartbeat,
            updated_at: clock::rfc3339(clock::wall_ms()),
            interval_ms,
            pauses_revision,
            fresh_on_read,
            apps: board.values().collect(),
            notify: notify.sinks,
            notify_lost: notify.lost,
        };
        let prom = textfile.is_some().then(|| prometheus::encode(&status));
        (StateDir::encode_status(&status), prom)
    };
    let written = match data.and_then(|d| shared.state.write_status(&d)) {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(message = "Cannot write status.json; withholding the heartbeat.", path = %shared.state.dir.display(), %error);
            false
        }
    };
    if let (Some(t), Some(text)) = (textfile, prom) {
        t.write(&text);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(apps: &str) -> Config {
        Config::parse(std::path::Path::new("/x.toml"), apps).unwrap()
    }

    #[test]
    fn the_watched_names_are_the_files_names() {
        use crate::report::{pauses::PAUSES_FILE, state::STATUS_FILE};
        assert_eq!(STATUS_FILE_C.to_str().unwrap(), STATUS_FILE);
        assert_eq!(PAUSES_FILE_C.to_str().unwrap(), PAUSES_FILE);
    }

    #[test]
    fn the_heartbeat_is_judged_by_its_own_cadence_not_the_longest_interval() {
        // One app checked hourly must not make the backup check trust a dead daemon for 3 h.
        let c = config("[[apps]]\nname = \"a\"\ninterval = \"1h\"\n[[apps]]\nname = \"b\"\ninterval = \"1s\"\nretry_interval = \"1s\"\n");
        assert_eq!(heartbeat_every(&c), 1_000);
        let c = config("[[apps]]\nname = \"a\"\ninterval = \"1h\"\nretry_interval = \"1h\"\n");
        assert_eq!(
            heartbeat_every(&c),
            5_000,
            "capped at 5 s: stale after 15 s"
        );
    }
}
