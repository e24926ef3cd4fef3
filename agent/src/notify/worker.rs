//! The notify thread: accepts events into per-sink queues (spooled before the first attempt),
//! delivers each sink's head when it is due, and keeps the counters `status` shows.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::logtail;
use super::payload::{self, Alert, Origin};
use super::retry::{self, Jitter, Outcome};
use super::{LogPaths, Msg, Options, SinkStatus};
use crate::clock::{self, Mono};
use crate::config::{duration, NotifyConfig, NotifyEvent};
use crate::net::{self, Url};
use crate::report::events::Event;
use crate::report::limit::Limiter;
use crate::report::spool::SpoolFile;

pub const SPOOL_FILE: &str = "notify.json";

/// The spool: each sink's undelivered alerts, oldest first, by sink name.
type Spooled = BTreeMap<String, VecDeque<Alert>>;

struct Sink {
    cfg: NotifyConfig,
    queue: VecDeque<Alert>,
    limiter: Limiter,
    /// Failed attempts in a row (0: healthy).
    failures: u32,
    next_ms: Mono,
    st: SinkStatus,
}

impl Sink {
    fn new(cfg: NotifyConfig) -> Sink {
        let st = SinkStatus {
            name: cfg.name.clone(),
            kind: cfg.kind.as_str().to_string(),
            url: shown(cfg.url.as_ref()),
            ..SinkStatus::default()
        };
        Sink {
            limiter: limiter(&cfg),
            cfg,
            queue: VecDeque::new(),
            failures: 0,
            next_ms: 0,
            st,
        }
    }

    fn due(&self, now: Mono) -> bool {
        !self.queue.is_empty() && self.next_ms <= now && self.cfg.url.is_some()
    }
}

fn limiter(cfg: &NotifyConfig) -> Limiter {
    Limiter::new(cfg.rate_window.as_millis() as u64, cfg.rate_limit as usize)
}

fn shown(url: Option<&Url>) -> String {
    url.map_or_else(|| "-".to_string(), Url::redacted)
}

pub(super) struct Worker {
    sinks: Vec<Sink>,
    spool: SpoolFile,
    origin: Origin,
    logs: LogPaths,
    opts: Options,
    status: Arc<Mutex<Vec<SinkStatus>>>,
    jitter: Jitter,
    seq: u64,
    dirty: bool,
}

impl Worker {
    pub(super) fn new(
        state_dir: &Path,
        origin: Origin,
        logs: LogPaths,
        opts: Options,
        status: Arc<Mutex<Vec<SinkStatus>>>,
    ) -> Worker {
        Worker {
            sinks: Vec::new(),
            spool: SpoolFile::new(state_dir, SPOOL_FILE),
            origin,
            logs,
            opts,
            status,
            jitter: Jitter::new(),
            seq: 0,
            dirty: false,
        }
    }

    /// Until a `Stop` (or the agent dropping its handle): take messages, spool, deliver.
    pub(super) fn run(mut self, sinks: Vec<NotifyConfig>, rx: &Receiver<Msg>) {
        self.sinks = sinks.into_iter().map(Sink::new).collect();
        self.load_spool();
        self.publish();
        let mut stop_at: Option<Mono> = None;
        loop {
            let now = clock::mono_now();
            match rx.recv_timeout(self.wait(now, stop_at)) {
                Ok(m) => {
                    self.take(m, &mut stop_at);
                    while let Ok(m) = rx.try_recv() {
                        self.take(m, &mut stop_at);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    stop_at.get_or_insert_with(clock::mono_now);
                }
            }
            self.store_spool();
            let now = clock::mono_now();
            if stop_at.is_some_and(|at| now >= at || !self.sinks.iter().any(|s| s.due(now))) {
                break;
            }
            self.deliver_due(now);
            self.publish();
        }
        self.store_spool();
        self.publish();
    }

    /// Until the next sink is due (or the stop deadline); an hour when nothing waits.
    fn wait(&self, now: Mono, stop_at: Option<Mono>) -> Duration {
        let next = self
            .sinks
            .iter()
            .filter(|s| !s.queue.is_empty() && s.cfg.url.is_some())
            .map(|s| s.next_ms)
            .chain(stop_at)
            .min()
            .unwrap_or(now + 3_600_000);
        Duration::from_millis(next.saturating_sub(now))
    }

    fn take(&mut self, m: Msg, stop_at: &mut Option<Mono>) {
        match m {
            Msg::Event(e, what) => self.accept(&e, what),
            Msg::Config(c) => self.reconfigure(c),
            Msg::Stop => {
                stop_at.get_or_insert_with(|| {
                    clock::mono_now() + self.opts.stop_deadline.as_millis() as u64
                });
            }
        }
    }

    /// The event becomes an alert in each sink that asked for it and whose rate limit lets it.
    fn accept(&mut self, e: &Event, what: NotifyEvent) {
        let app = e.app.as_deref().unwrap_or("-");
        for i in 0..self.sinks.len() {
            let s = &mut self.sinks[i];
            if !s.cfg.events.contains(&what) {
                continue;
            }
            let Some(held_back) = s.limiter.admit(app, e.ts_ms) else {
                s.st.held_back += 1;
                tracing::info!(message = "Alert held back by the rate limit.", sink = %s.cfg.name, app, event = what.as_str(), limit = s.cfg.rate_limit, window = %duration::format(s.cfg.rate_window));
                continue;
            };
            self.seq += 1;
            let id = format!("{}-{}", e.ts_ms, self.seq);
            let mut alert = Alert::new(id, what, e, &self.origin, held_back);
            let s = &mut self.sinks[i];
            if s.cfg.attach_log_lines > 0 {
                let path = e.app.as_deref().and_then(|a| (self.logs)(a));
                alert.log = Some(logtail::tail(
                    path.as_deref(),
                    s.cfg.attach_log_lines as usize,
                ));
            }
            s.queue.push_back(alert);
            if s.queue.len() > self.opts.queue_cap {
                s.queue.pop_front();
                s.st.dropped += 1;
                tracing::warn!(message = "Notify queue full; dropped the oldest alert.", sink = %s.cfg.name, url = %shown(s.cfg.url.as_ref()));
            }
            self.dirty = true;
        }
    }

    /// A reload: sinks matched by name keep their queue, counters and (same limits) limiter.
    fn reconfigure(&mut self, configs: Vec<NotifyConfig>) {
        let mut old: BTreeMap<String, Sink> = std::mem::take(&mut self.sinks)
            .into_iter()
            .map(|s| (s.cfg.name.clone(), s))
            .collect();
        for cfg in configs {
            let sink = match old.remove(&cfg.name) {
                Some(mut s) => {
                    if (s.cfg.rate_limit, s.cfg.rate_window) != (cfg.rate_limit, cfg.rate_window) {
                        s.limiter = limiter(&cfg);
                    }
                    if s.cfg.url != cfg.url {
                        // A new address: try it now rather than after the old one's backoff.
                        (s.failures, s.next_ms) = (0, 0);
                    }
                    s.st.kind = cfg.kind.as_str().to_string();
                    s.st.url = shown(cfg.url.as_ref());
                    s.cfg = cfg;
                    s
                }
                None => Sink::new(cfg),
            };
            self.sinks.push(sink);
        }
        for (name, s) in old {
            if !s.queue.is_empty() {
                tracing::warn!(message = "A notify sink was removed from the config; its undelivered alerts are dropped.", sink = %name, dropped = s.queue.len());
            }
        }
        self.dirty = true;
        tracing::info!(
            message = "Notify sinks configured.",
            sinks = self.sinks.len()
        );
    }

    /// One attempt for each sink whose head is due (one per step keeps the inbox responsive).
    fn deliver_due(&mut self, now: Mono) {
        for i in 0..self.sinks.len() {
            if !self.sinks[i].due(now) {
                continue;
            }
            let outcome = self.attempt(i);
            let jitter = self.jitter.sample();
            let s = &mut self.sinks[i];
            let before = s.queue.len();
            match outcome {
                Outcome::Delivered => delivered(s),
                Outcome::Retry { error, after_ms } => {
                    s.failures += 1;
                    let cap = s.cfg.retry_max_interval.as_millis() as u64;
                    let wait = retry::backoff_ms(s.failures, cap, jitter, after_ms);
                    s.next_ms = clock::mono_now() + wait;
                    failed(s, &error, wait);
                }
                Outcome::Refused { status } => refused(s, status),
            }
            self.dirty |= self.sinks[i].queue.len() != before;
        }
        self.store_spool();
    }

    fn attempt(&self, i: usize) -> Outcome {
        let s = &self.sinks[i];
        let (Some(url), Some(head)) = (s.cfg.url.as_ref(), s.queue.front()) else {
            return Outcome::Delivered;
        };
        let window = duration::format(s.cfg.rate_window);
        let body = payload::body(s.cfg.kind, head, &window);
        let agent = concat!("pmguard-agent/", env!("CARGO_PKG_VERSION"));
        let headers = [("Content-Type", "application/json"), ("User-Agent", agent)];
        let req = net::Request {
            method: "POST",
            url,
            headers: &headers,
            body: &body,
        };
        retry::classify(&net::send(&req, &self.opts.limits))
    }

    fn load_spool(&mut self) {
        let spooled: Spooled = match self.spool.load() {
            Ok(s) => s.unwrap_or_default(),
            Err(error) => {
                tracing::warn!(message = "Cannot read the notify spool.", path = %self.spool.path().display(), %error);
                return;
            }
        };
        for (name, older) in spooled {
            match self.sinks.iter_mut().find(|s| s.cfg.name == name) {
                Some(s) => {
                    let newer = std::mem::replace(&mut s.queue, older);
                    s.queue.extend(newer);
                    tracing::info!(message = "Undelivered alerts from the last run are queued again.", sink = %name, queued = s.queue.len());
                }
                None => {
                    tracing::warn!(message = "Spooled alerts for a notify sink that is no longer configured are dropped.", sink = %name, dropped = older.len());
                }
            }
        }
        self.dirty = true;
    }

    /// Writes the spool if anything changed (an empty spool is no file).
    fn store_spool(&mut self) {
        if !self.dirty {
            return;
        }
        let spooled: Spooled = self
            .sinks
            .iter()
            .filter(|s| !s.queue.is_empty())
            .map(|s| (s.cfg.name.clone(), s.queue.clone()))
            .collect();
        let content = (!spooled.is_empty()).then_some(&spooled);
        match self.spool.store(content) {
            Ok(()) => self.dirty = false,
            Err(error) => {
                tracing::warn!(message = "Cannot write the notify spool; alerts are kept in memory.", path = %self.spool.path().display(), %error);
            }
        }
    }

    fn publish(&self) {
        let list = self
            .sinks
            .iter()
            .map(|s| SinkStatus {
                queued: s.queue.len(),
                ..s.st.clone()
            })
            .collect();
        *crate::sync::lock(&self.status) = list;
    }
}

fn delivered(s: &mut Sink) {
    if let Some(a) = s.queue.pop_front() {
        s.st.delivered += 1;
        if s.failures > 0 {
            tracing::info!(message = "Alert delivery works again.", sink = %s.cfg.name, url = %shown(s.cfg.url.as_ref()), attempt = s.failures + 1);
        }
        tracing::info!(message = "Alert delivered.", sink = %s.cfg.name, app = a.app.as_deref().unwrap_or("-"), event = %a.event, id = %a.id);
    }
    (s.failures, s.next_ms) = (0, 0);
}

/// Said at the first failure and then every tenth, not at every attempt of a long outage.
fn failed(s: &mut Sink, error: &str, wait_ms: u64) {
    s.st.last_error = Some(error.to_string());
    s.st.last_error_at = Some(clock::rfc3339(clock::wall_ms()));
    if s.failures == 1 || s.failures.is_multiple_of(10) {
        tracing::warn!(message = "Alert delivery failed; retrying.", sink = %s.cfg.name, url = %shown(s.cfg.url.as_ref()), attempt = s.failures, retry_in_ms = wait_ms, queued = s.queue.len(), %error);
    } else {
        tracing::debug!(message = "Alert delivery failed; retrying.", sink = %s.cfg.name, attempt = s.failures, retry_in_ms = wait_ms, %error);
    }
}

/// A 4xx other than 408/429: the endpoint will never take this alert; drop it and say so once.
fn refused(s: &mut Sink, status: u16) {
    let Some(a) = s.queue.pop_front() else {
        return;
    };
    s.st.dropped += 1;
    let error = format!("HTTP {status}: refused; alert dropped");
    s.st.last_error = Some(error.clone());
    s.st.last_error_at = Some(clock::rfc3339(clock::wall_ms()));
    tracing::error!(message = "The notify endpoint refused an alert; dropped (check the URL and the sink's settings).", sink = %s.cfg.name, url = %shown(s.cfg.url.as_ref()), status, app = a.app.as_deref().unwrap_or("-"), event = %a.event, id = %a.id);
    (s.failures, s.next_ms) = (0, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::report::events::Kind;

    fn sinks(extra: &str) -> Vec<NotifyConfig> {
        let text = format!(
            "[[apps]]\nname = \"web\"\n[[notify]]\ntype = \"webhook\"\nname = \"hook\"\nurl = \"http://127.0.0.1:9/h\"\nrate_limit = 1000\n{extra}"
        );
        Config::parse(Path::new("/x.toml"), &text).unwrap().notify
    }

    fn worker(dir: &Path, queue_cap: usize) -> Worker {
        let opts = Options {
            queue_cap,
            ..Options::default()
        };
        let origin = Origin {
            host: "box".into(),
            instance_id: None,
        };
        let logs: LogPaths = Arc::new(|_: &str| None);
        Worker::new(dir, origin, logs, opts, Arc::new(Mutex::new(Vec::new())))
    }

    fn restart(n: u64) -> Event {
        let mut e = Event::new(Kind::Restart, Some("web"), format!("restart {n}"));
        e.ts_ms = 1_000 + n;
        e
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_and_the_spool_holds_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let mut w = worker(d.path(), 2);
        w.sinks = sinks("").into_iter().map(Sink::new).collect();
        for n in 0..3 {
            w.accept(&restart(n), NotifyEvent::Restart);
        }
        w.store_spool();
        let s = &w.sinks[0];
        assert_eq!(s.st.dropped, 1);
        let kept: Vec<&str> = s.queue.iter().map(|a| a.message.as_str()).collect();
        assert_eq!(kept, ["restart 1", "restart 2"]);
        let spooled: Spooled = w.spool.load().unwrap().unwrap();
        assert_eq!(spooled["hook"].len(), 2);
        use std::os::unix::fs::MetadataExt;
        let mode = std::fs::metadata(w.spool.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // The next run queues them again, before its own alerts.
        let mut next = worker(d.path(), 10);
        next.sinks = sinks("").into_iter().map(Sink::new).collect();
        next.sinks[0].queue.push_back(Alert::new(
            "x".into(),
            NotifyEvent::Restart,
            &restart(9),
            &next.origin,
            0,
        ));
        next.load_spool();
        let order: Vec<&str> = next.sinks[0]
            .queue
            .iter()
            .map(|a| a.message.as_str())
            .collect();
        assert_eq!(order, ["restart 1", "restart 2", "restart 9"]);
    }

    #[test]
    fn a_reload_keeps_a_sinks_queue_by_name_and_drops_a_removed_sinks() {
        let d = tempfile::tempdir().unwrap();
        let mut w = worker(d.path(), 10);
        w.sinks = sinks("events = [\"restart\"]")
            .into_iter()
            .map(Sink::new)
            .collect();
        w.accept(&restart(1), NotifyEvent::Restart);
        w.accept(&restart(2), NotifyEvent::Recovered);
        assert_eq!(w.sinks[0].queue.len(), 1, "recovered was not asked for");
        w.reconfigure(sinks(""));
        assert_eq!(w.sinks[0].queue.len(), 1);
        assert_eq!(w.sinks[0].cfg.events.len(), 5);
        w.reconfigure(Vec::new());
        w.store_spool();
        assert!(w.sinks.is_empty());
        assert!(!w.spool.path().exists(), "no sink, nothing spooled");
    }
}
