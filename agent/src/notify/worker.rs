//! The notify threads and the state they share.
//!
//! - `notify` (the acceptor) takes the inbox's messages, turns events into alerts in each sink's
//!   queue and appends them to the journal at once; it never touches the network, so an alert
//!   is on disk milliseconds after the event, whatever an endpoint does.
//! - `notify-send` (the sender) delivers each sink's head when it is due, one request at a
//!   time, with the state unlocked while the request runs, then records the outcome.
//!
//! A sink is known to the sender by its `key`, which a reload keeps for a sink it carries over,
//! so an outcome that comes back after a reload lands on the right queue (or on none). An
//! outcome from the address the sink had before the reload (an attempt in flight across it)
//! counts only as a delivery: see `record`.
//!
//! A sink keeps its queue when its name is kept or, renamed, when its type and URL are (its
//! `target`): at a reload (`reconfigure`) and, through the journal's `target`, at a start.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::journal::{self, Journal, Loaded, Queue, Record, Spooled};
use super::logtail;
use super::payload::{self, Alert, Origin};
use super::retry::{self, Jitter, Outcome};
use super::{LogPaths, Msg, Options, SinkStatus};
use crate::clock::{self, Mono};
use crate::config::{duration, NotifyConfig, NotifyEvent, NotifyKind};
use crate::net::{self, Url};
use crate::report::events::Event;
use crate::report::limit::Limiter;
use crate::sync::lock;

struct Sink {
    key: u64,
    cfg: NotifyConfig,
    /// `target(&cfg)`, journaled with each alert.
    target: Option<String>,
    queue: VecDeque<Alert>,
    limiter: Limiter,
    /// Failed attempts in a row (0: healthy).
    failures: u32,
    next_ms: Mono,
    st: SinkStatus,
}

impl Sink {
    fn new(key: u64, cfg: NotifyConfig) -> Sink {
        let st = SinkStatus {
            name: cfg.name.clone(),
            kind: cfg.kind.as_str().to_string(),
            url: shown(cfg.url.as_ref()),
            ..SinkStatus::default()
        };
        Sink {
            key,
            limiter: limiter(&cfg),
            target: target(&cfg),
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

/// A sink's type and URL, hashed (SHA-256, 16 hex digits): what identifies a renamed sink in
/// the journal across a restart, without writing its URL (often a secret) there.
fn target(cfg: &NotifyConfig) -> Option<String> {
    let url = cfg.url.as_ref()?;
    let text = format!(
        "{}\n{}\n{}\n{}\n{}",
        cfg.kind.as_str(),
        if url.https { "https" } else { "http" },
        url.host,
        url.port,
        url.target
    );
    let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    Some(
        hash.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

fn limiter(cfg: &NotifyConfig) -> Limiter {
    Limiter::new(cfg.rate_window.as_millis() as u64, cfg.rate_limit as usize)
}

fn shown(url: Option<&Url>) -> String {
    url.map_or_else(|| "-".to_string(), Url::redacted)
}

/// What both threads share, under one lock.
pub(super) struct State {
    sinks: Vec<Sink>,
    journal: Journal,
    /// Set by a stop: the sender starts no attempt after it.
    stop_at: Option<Mono>,
    next_key: u64,
    /// Why the journal cannot be written, from the first failure until a rewrite works.
    spool_error: Option<String>,
}

impl State {
    fn new(state_dir: &Path) -> State {
        State {
            sinks: Vec::new(),
            journal: Journal::new(state_dir),
            stop_at: None,
            next_key: 0,
            spool_error: None,
        }
    }

    fn add_sink(&mut self, cfg: NotifyConfig) -> Sink {
        self.next_key += 1;
        Sink::new(self.next_key, cfg)
    }

    fn spooled(&self) -> Spooled {
        self.sinks
            .iter()
            .filter(|s| !s.queue.is_empty())
            .map(|s| {
                let q = Queue {
                    target: s.target.clone(),
                    alerts: s.queue.clone(),
                    over: 0,
                };
                (s.cfg.name.clone(), q)
            })
            .collect()
    }

    /// Journals `records`. When the journal cannot take them (an append or its fsync failed,
    /// now or before), it is rewritten from the queues, which hold every accepted alert: a
    /// file handle that failed is never written to again, and a record is never appended
    /// after a torn one.
    fn append(&mut self, records: &[Record]) {
        if !self.journal.is_stale() {
            if let Err(error) = self.journal.append(records) {
                self.spool_failed(&error);
            }
        }
        let live = self.sinks.iter().map(|s| s.queue.len()).sum();
        // Nothing left: the file goes (an empty spool is no file).
        if self.journal.is_stale() || live == 0 || self.journal.wants_compaction(live) {
            self.compact();
        }
    }

    fn compact(&mut self) {
        let spooled = self.spooled();
        match self.journal.compact(&spooled) {
            Ok(()) => {
                if self.spool_error.take().is_some() {
                    tracing::info!(message = "The notify spool is written again; it was rewritten from the alerts kept in memory.", path = %self.journal.path().display());
                }
            }
            Err(error) => self.spool_failed(&error),
        }
    }

    /// Said once (an error log, and each sink's `last_error` in status) until a rewrite works:
    /// the alerts are still sent, but a stop now would lose those the file lacks.
    fn spool_failed(&mut self, error: &std::io::Error) {
        let path = self.journal.path();
        if self.spool_error.is_some() {
            tracing::debug!(message = "The notify spool still cannot be written.", path = %path.display(), %error);
            return;
        }
        tracing::error!(message = "Cannot write the notify spool; alerts are kept in memory and the spool is rewritten from them once it can be (an agent stop before then loses them).", path = %path.display(), %error);
        let text = format!(
            "cannot write the spool {}: {error}; alerts are kept in memory until it can be rewritten",
            path.display()
        );
        let at = clock::rfc3339(clock::wall_ms());
        for s in &mut self.sinks {
            s.st.last_error = Some(text.clone());
            s.st.last_error_at = Some(at.clone());
        }
        self.spool_error = Some(text);
    }
}

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// Given when an alert is queued, a sink changes or a stop comes.
    pub(super) wake: Condvar,
    pub(super) status: Mutex<Vec<SinkStatus>>,
    /// Alerts lost with no sink to count them: the queue of a sink a reload removed (or that
    /// a start found no sink for), and the alerts of unreadable journal lines.
    pub(super) removed: AtomicU64,
}

impl Shared {
    pub(super) fn new(state_dir: &Path) -> Shared {
        Shared {
            state: Mutex::new(State::new(state_dir)),
            wake: Condvar::new(),
            status: Mutex::new(Vec::new()),
            removed: AtomicU64::new(0),
        }
    }

    fn publish(&self, st: &State) {
        let list = st
            .sinks
            .iter()
            .map(|s| SinkStatus {
                queued: s.queue.len(),
                ..s.st.clone()
            })
            .collect();
        *lock(&self.status) = list;
    }

    /// Sets the stop deadline (once) and wakes the sender.
    pub(super) fn stop(&self, deadline: Duration) {
        let mut st = lock(&self.state);
        st.stop_at
            .get_or_insert_with(|| clock::mono_now() + deadline.as_millis() as u64);
        self.wake.notify_all();
    }
}

/// The `notify` thread's own state.
pub(super) struct Acceptor {
    shared: Arc<Shared>,
    origin: Origin,
    logs: LogPaths,
    opts: Options,
    seq: u64,
}

impl Acceptor {
    pub(super) fn new(shared: Arc<Shared>, origin: Origin, logs: LogPaths, opts: Options) -> Self {
        Acceptor {
            shared,
            origin,
            logs,
            opts,
            seq: 0,
        }
    }

    /// Until a `Stop` (or the agent dropping its handle): take every waiting message, then
    /// write what they added to the journal in one append.
    /// `waiting` counts the events sent and not yet taken (the inbox's cap).
    pub(super) fn run(
        mut self,
        sinks: Vec<NotifyConfig>,
        rx: &Receiver<Msg>,
        waiting: &AtomicUsize,
    ) {
        self.start(sinks);
        while let Ok(first) = rx.recv() {
            let mut records = Vec::new();
            let mut stop = false;
            let shared = self.shared.clone();
            let mut st = lock(&shared.state);
            for m in std::iter::once(first).chain(rx.try_iter()) {
                match m {
                    Msg::Event(e, what) => {
                        waiting.fetch_sub(1, Ordering::AcqRel);
                        let now = clock::mono_now();
                        self.accept(&mut st, &e, what, now, &mut records);
                    }
                    Msg::Config(c) => {
                        st.append(&std::mem::take(&mut records));
                        reconfigure(&mut st, &shared, c);
                    }
                    Msg::Stop => stop = true,
                }
            }
            st.append(&records);
            shared.publish(&st);
            shared.wake.notify_all();
            drop(st);
            if stop {
                break;
            }
        }
        self.shared.stop(self.opts.stop_deadline);
    }

    /// The configured sinks, with the alerts a previous run left spooled first in their queues.
    fn start(&mut self, configs: Vec<NotifyConfig>) {
        let shared = self.shared.clone();
        let mut st = lock(&shared.state);
        let sinks: Vec<Sink> = configs.into_iter().map(|c| st.add_sink(c)).collect();
        st.sinks = sinks;
        // A spool that cannot be read is moved aside, never compacted away: what it holds may
        // still be recovered by hand.
        let loaded = st.journal.load(self.opts.queue_cap).unwrap_or_else(|error| {
            let aside = st.journal.set_aside();
            tracing::error!(message = "Cannot read the notify spool; moved aside (not deleted), its alerts are not sent.", path = %st.journal.path().display(), aside = ?aside, %error);
            Loaded::default()
        });
        shared.removed.fetch_add(loaded.lost, Ordering::Relaxed);
        requeue(&mut st, &shared, loaded.spooled);
        st.compact();
        shared.publish(&st);
        shared.wake.notify_all();
    }

    /// The event becomes an alert in each sink that asked for it and whose rate limit lets it.
    /// The limit counts in monotonic time (`now`), not the event's wall clock: a clock stepped
    /// back must not hold an app's alerts for the step.
    fn accept(
        &mut self,
        st: &mut State,
        e: &Event,
        what: NotifyEvent,
        now: Mono,
        out: &mut Vec<Record>,
    ) {
        let app = e.app.as_deref().unwrap_or("-");
        for s in &mut st.sinks {
            if !s.cfg.events.contains(&what) {
                continue;
            }
            let Some(held_back) = s.limiter.admit(app, now) else {
                s.st.held_back += 1;
                tracing::info!(message = "Alert held back by the rate limit.", sink = %s.cfg.name, app, event = what.as_str(), limit = s.cfg.rate_limit, window = %duration::format(s.cfg.rate_window));
                continue;
            };
            self.seq += 1;
            let id = format!("{}-{}", e.ts_ms, self.seq);
            let mut alert = Alert::new(id, what, e, &self.origin, held_back);
            if s.cfg.attach_log_lines > 0 {
                let path = e.app.as_deref().and_then(|a| (self.logs)(a));
                let n = s.cfg.attach_log_lines as usize;
                alert.log = Some(logtail::tail(path.as_deref(), n, &self.opts.log_owners));
            }
            let record = Record::Add {
                sink: s.cfg.name.clone(),
                target: s.target.clone(),
                alert: Box::new(alert.clone()),
            };
            if record.too_long() {
                // Never written: a line the journal could not read back would lose more.
                s.st.dropped += 1;
                tracing::error!(message = "An alert is too long to spool; dropped.", sink = %s.cfg.name, app, event = what.as_str(), max_bytes = journal::MAX_LINE);
                continue;
            }
            out.push(record);
            s.queue.push_back(alert);
            if s.queue.len() > self.opts.queue_cap {
                if let Some(old) = s.queue.pop_front() {
                    out.push(done(s, &old));
                }
                s.st.dropped += 1;
                tracing::warn!(message = "Notify queue full; dropped the oldest alert.", sink = %s.cfg.name, url = %shown(s.cfg.url.as_ref()));
            }
        }
    }
}

fn done(s: &Sink, a: &Alert) -> Record {
    Record::Done {
        sink: s.cfg.name.clone(),
        id: a.id.clone(),
    }
}

/// The queues a previous run left, each to the sink of the same name or, renamed while the
/// agent was stopped, to the sink with the same type and URL (the journal's `target`; the rule
/// a reload follows) that has no queue of its own name. A queue no sink takes is dropped,
/// counted (`Board::lost`) and said as an error.
fn requeue(st: &mut State, shared: &Shared, spooled: Spooled) {
    let mut taken = vec![false; st.sinks.len()];
    let mut orphans = Vec::new();
    for (name, q) in spooled {
        match st.sinks.iter().position(|s| s.cfg.name == name) {
            Some(i) => {
                taken[i] = true;
                take_queue(&mut st.sinks[i], q);
            }
            None => orphans.push((name, q)),
        }
    }
    for (name, q) in orphans {
        let renamed = st
            .sinks
            .iter()
            .enumerate()
            .position(|(i, s)| !taken[i] && s.target.is_some() && s.target == q.target);
        match renamed {
            Some(i) => {
                taken[i] = true;
                let s = &mut st.sinks[i];
                tracing::info!(message = "A notify sink was renamed while the agent was stopped (same type and URL); its spooled alerts follow it.", sink = %s.cfg.name, was = %name, queued = q.alerts.len());
                take_queue(s, q);
            }
            None => {
                let n = q.alerts.len() as u64;
                shared.removed.fetch_add(n, Ordering::Relaxed);
                tracing::error!(message = "Spooled alerts for a notify sink that is no longer configured (no sink has its name, or its type and URL) are dropped.", sink = %name, dropped = n);
            }
        }
    }
}

fn take_queue(s: &mut Sink, q: Queue) {
    s.queue = q.alerts;
    if q.over > 0 {
        s.st.dropped += q.over;
        tracing::warn!(message = "More alerts were spooled than a notify queue holds; dropped the oldest.", sink = %s.cfg.name, dropped = q.over);
    }
    if !s.queue.is_empty() {
        tracing::info!(message = "Undelivered alerts from the last run are queued again.", sink = %s.cfg.name, queued = s.queue.len());
    }
}

/// A reload: a sink keeps its queue, counters and (same limits) limiter when its name is kept,
/// or, renamed, when its type and URL are; the queue of a sink that is gone is dropped, counted
/// (`Board::lost`) and said as an error.
fn reconfigure(st: &mut State, shared: &Shared, configs: Vec<NotifyConfig>) {
    let mut old: BTreeMap<String, Sink> = std::mem::take(&mut st.sinks)
        .into_iter()
        .map(|s| (s.cfg.name.clone(), s))
        .collect();
    let kept: Vec<(NotifyConfig, Option<Sink>)> = configs
        .into_iter()
        .map(|c| {
            let s = old.remove(&c.name);
            (c, s)
        })
        .collect();
    for (cfg, by_name) in kept {
        let renamed = || {
            let name = old
                .iter()
                .find(|(_, s)| {
                    s.cfg.kind == cfg.kind && s.cfg.url.is_some() && s.cfg.url == cfg.url
                })
                .map(|(n, _)| n.clone())?;
            old.remove(&name)
        };
        let sink = match by_name.or_else(renamed) {
            Some(s) => {
                if s.cfg.name != cfg.name {
                    tracing::info!(message = "A notify sink was renamed; its queue and counters are kept.", sink = %cfg.name, was = %s.cfg.name, queued = s.queue.len());
                }
                carry(s, cfg)
            }
            None => st.add_sink(cfg),
        };
        st.sinks.push(sink);
    }
    for (name, s) in old {
        if !s.queue.is_empty() {
            shared
                .removed
                .fetch_add(s.queue.len() as u64, Ordering::Relaxed);
            tracing::error!(message = "A notify sink was removed from the config; its undelivered alerts are dropped.", sink = %name, dropped = s.queue.len());
        }
    }
    st.compact();
    tracing::info!(message = "Notify sinks configured.", sinks = st.sinks.len());
}

/// A kept sink under its new config: the queue and counters stay.
fn carry(mut s: Sink, cfg: NotifyConfig) -> Sink {
    if (s.cfg.rate_limit, s.cfg.rate_window) != (cfg.rate_limit, cfg.rate_window) {
        s.limiter = limiter(&cfg);
    }
    if s.cfg.url != cfg.url {
        // A new address: try it now rather than after the old one's backoff.
        (s.failures, s.next_ms) = (0, 0);
    }
    s.st.name = cfg.name.clone();
    s.st.kind = cfg.kind.as_str().to_string();
    s.st.url = shown(cfg.url.as_ref());
    s.target = target(&cfg);
    s.cfg = cfg;
    s
}

/// One attempt's inputs, copied out so the request runs with the state unlocked.
struct Job {
    key: u64,
    url: Url,
    kind: NotifyKind,
    window: Duration,
    head: Alert,
}

/// The `notify-send` thread: until the stop deadline, or a stop with nothing due.
pub(super) fn send_loop(shared: &Shared, limits: &net::Limits) {
    let mut jitter = Jitter::new();
    let mut st = lock(&shared.state);
    loop {
        let now = clock::mono_now();
        if st
            .stop_at
            .is_some_and(|at| now >= at || !st.sinks.iter().any(|s| s.due(now)))
        {
            break;
        }
        let Some(job) = next_job(&st, now) else {
            let wait = wait(&st, now);
            st = shared
                .wake
                .wait_timeout(st, wait)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
            continue;
        };
        drop(st);
        let outcome = attempt(&job, limits);
        st = lock(&shared.state);
        record(&mut st, &job, outcome, jitter.sample());
        shared.publish(&st);
    }
}

/// Until the next sink is due (or the stop deadline); an hour when nothing waits.
fn wait(st: &State, now: Mono) -> Duration {
    let next = st
        .sinks
        .iter()
        .filter(|s| !s.queue.is_empty() && s.cfg.url.is_some())
        .map(|s| s.next_ms)
        .chain(st.stop_at)
        .min()
        .unwrap_or(now + 3_600_000);
    Duration::from_millis(next.saturating_sub(now).max(1))
}

/// The head of the sink that has waited longest among those due.
fn next_job(st: &State, now: Mono) -> Option<Job> {
    let s = st
        .sinks
        .iter()
        .filter(|s| s.due(now))
        .min_by_key(|s| s.next_ms)?;
    Some(Job {
        key: s.key,
        url: s.cfg.url.clone()?,
        kind: s.cfg.kind,
        window: s.cfg.rate_window,
        head: s.queue.front()?.clone(),
    })
}

fn attempt(job: &Job, limits: &net::Limits) -> Outcome {
    let window = duration::format(job.window);
    let body = payload::body(job.kind, &job.head, &window);
    let agent = concat!("pmguard-agent/", env!("CARGO_PKG_VERSION"));
    let headers = [("Content-Type", "application/json"), ("User-Agent", agent)];
    let req = net::Request {
        method: "POST",
        url: &job.url,
        headers: &headers,
        body: &body,
    };
    retry::classify(&net::send(&req, limits))
}

/// The outcome, on the sink the job came from if it is still there with the same head.
///
/// When a reload gave the sink another URL (or type) while the attempt ran, the reply is the
/// old address's: a 2xx still delivers the alert (it reached the old endpoint, and sending it
/// again would be a duplicate), but a refusal, a redirect or a failure says nothing about the
/// new address: the alert is neither dropped nor delayed, and the new URL gets it at once,
/// with no backoff or error of the old one's (the reload is what a person does to fix a URL).
fn record(st: &mut State, job: &Job, outcome: Outcome, jitter: f64) {
    let Some(s) = st.sinks.iter_mut().find(|s| s.key == job.key) else {
        return;
    };
    if s.queue.front().map(|a| &a.id) != Some(&job.head.id) {
        return;
    }
    let moved = s.cfg.url.as_ref() != Some(&job.url) || s.cfg.kind != job.kind;
    if moved {
        let reply = match &outcome {
            Outcome::Delivered => None,
            Outcome::Retry { error, .. } => Some(error.clone()),
            Outcome::Redirected { status } | Outcome::Refused { status } => {
                Some(format!("HTTP {status}"))
            }
        };
        if let Some(reply) = reply {
            tracing::info!(message = "A reply from a notify sink's previous URL came after a reload; not held against the new URL, which gets the alert now.", sink = %s.cfg.name, was = %job.url.redacted(), url = %shown(s.cfg.url.as_ref()), %reply, id = %job.head.id);
            return;
        }
    }
    let gone = match outcome {
        Outcome::Delivered => delivered(s),
        Outcome::Retry { error, after_ms } => {
            s.failures += 1;
            let cap = s.cfg.retry_max_interval.as_millis() as u64;
            let wait = retry::backoff_ms(s.failures, cap, jitter, after_ms);
            s.next_ms = clock::mono_now() + wait;
            failed(s, &error, wait);
            None
        }
        Outcome::Redirected { status } => {
            s.failures += 1;
            let cap = s.cfg.retry_max_interval.as_millis() as u64;
            let wait = retry::backoff_ms(s.failures, cap, jitter, None);
            s.next_ms = clock::mono_now() + wait;
            redirected(s, status, wait);
            None
        }
        Outcome::Refused { status } => refused(s, status),
    };
    if let Some(r) = gone {
        st.append(&[r]);
    }
}

fn delivered(s: &mut Sink) -> Option<Record> {
    let a = s.queue.pop_front()?;
    s.st.delivered += 1;
    if s.failures > 0 {
        tracing::info!(message = "Alert delivery works again.", sink = %s.cfg.name, url = %shown(s.cfg.url.as_ref()), attempt = s.failures + 1);
    }
    tracing::info!(message = "Alert delivered.", sink = %s.cfg.name, app = a.app.as_deref().unwrap_or("-"), event = %a.event, id = %a.id);
    (s.failures, s.next_ms) = (0, 0);
    Some(done(s, &a))
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

/// A 3xx: the URL is wrong (moved); a person must fix it. Said as an error at the first and
/// every tenth attempt; the alert waits.
fn redirected(s: &mut Sink, status: u16, wait_ms: u64) {
    let error = format!("HTTP {status}: the endpoint redirects (not followed); fix the sink's URL");
    s.st.last_error = Some(error.clone());
    s.st.last_error_at = Some(clock::rfc3339(clock::wall_ms()));
    if s.failures == 1 || s.failures.is_multiple_of(10) {
        tracing::error!(message = "The notify endpoint answers with a redirect, which is not followed; the alert waits (write the sink's current URL in the config).", sink = %s.cfg.name, url = %shown(s.cfg.url.as_ref()), status, attempt = s.failures, retry_in_ms = wait_ms, queued = s.queue.len());
    }
}

/// A 4xx other than 408/429: the endpoint will never take this alert; drop it and say so once.
fn refused(s: &mut Sink, status: u16) -> Option<Record> {
    let a = s.queue.pop_front()?;
    s.st.dropped += 1;
    let error = format!("HTTP {status}: refused; alert dropped");
    s.st.last_error = Some(error.clone());
    s.st.last_error_at = Some(clock::rfc3339(clock::wall_ms()));
    tracing::error!(message = "The notify endpoint refused an alert; dropped (check the URL and the sink's settings).", sink = %s.cfg.name, url = %shown(s.cfg.url.as_ref()), status, app = a.app.as_deref().unwrap_or("-"), event = %a.event, id = %a.id);
    (s.failures, s.next_ms) = (0, 0);
    Some(done(s, &a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::report::events::Kind;

    fn sinks(extra: &str) -> Vec<NotifyConfig> {
        let limit = if extra.contains("rate_limit") {
            ""
        } else {
            "rate_limit = 1000\n"
        };
        let text = format!(
            "[[apps]]\nname = \"web\"\n[[notify]]\ntype = \"webhook\"\nname = \"hook\"\nurl = \"http://127.0.0.1:9/h\"\n{limit}{extra}"
        );
        Config::parse(Path::new("/x.toml"), &text).unwrap().notify
    }

    fn acceptor(dir: &Path, queue_cap: usize) -> Acceptor {
        let opts = Options {
            queue_cap,
            ..Options::default()
        };
        let origin = Origin {
            host: "box".into(),
            instance_id: None,
        };
        let logs: LogPaths = Arc::new(|_: &str| None);
        Acceptor::new(Arc::new(Shared::new(dir)), origin, logs, opts)
    }

    fn restart(n: u64) -> Event {
        let mut e = Event::new(Kind::Restart, Some("web"), format!("restart {n}"));
        e.ts_ms = 1_000 + n;
        e
    }

    /// Accepts `events` as the thread does: one journal append for the lot.
    fn take(a: &mut Acceptor, events: &[(Event, NotifyEvent)]) {
        let shared = a.shared.clone();
        let mut st = lock(&shared.state);
        let mut records = Vec::new();
        for (e, what) in events {
            a.accept(&mut st, e, *what, 1_000 + e.ts_ms, &mut records);
        }
        st.append(&records);
    }

    fn queue(a: &Acceptor, i: usize) -> Vec<String> {
        let st = lock(&a.shared.state);
        st.sinks[i]
            .queue
            .iter()
            .map(|x| x.message.clone())
            .collect()
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_and_the_spool_holds_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let mut a = acceptor(d.path(), 2);
        a.start(sinks(""));
        let events: Vec<_> = (0..3).map(|n| (restart(n), NotifyEvent::Restart)).collect();
        take(&mut a, &events);
        assert_eq!(lock(&a.shared.state).sinks[0].st.dropped, 1);
        assert_eq!(queue(&a, 0), ["restart 1", "restart 2"]);
        // The next run queues them again, before its own alerts.
        let mut next = acceptor(d.path(), 10);
        next.start(sinks(""));
        take(&mut next, &[(restart(9), NotifyEvent::Restart)]);
        assert_eq!(queue(&next, 0), ["restart 1", "restart 2", "restart 9"]);
    }

    #[test]
    fn an_unreadable_spool_is_moved_aside_not_deleted() {
        let d = tempfile::tempdir().unwrap();
        let mut a = acceptor(d.path(), 10);
        a.start(sinks(""));
        take(&mut a, &[(restart(1), NotifyEvent::Restart)]);
        let path = lock(&a.shared.state).journal.path();
        assert!(path.exists());
        // Not a regular file any more (as after a botched hand edit): unreadable.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("kept"), b"x").unwrap();
        let mut next = acceptor(d.path(), 10);
        next.start(sinks(""));
        let aside = path.with_file_name(format!(
            "{}.unreadable",
            super::super::journal::JOURNAL_FILE
        ));
        assert!(aside.join("kept").exists(), "moved aside, not deleted");
        assert!(!path.exists());
    }

    #[test]
    fn a_reload_keeps_a_sinks_queue_by_name_and_drops_a_removed_sinks() {
        let d = tempfile::tempdir().unwrap();
        let mut a = acceptor(d.path(), 10);
        a.start(sinks("events = [\"restart\"]"));
        take(
            &mut a,
            &[
                (restart(1), NotifyEvent::Restart),
                (restart(2), NotifyEvent::Recovered),
            ],
        );
        assert_eq!(queue(&a, 0).len(), 1, "recovered was not asked for");
        let shared = a.shared.clone();
        reconfigure(&mut lock(&shared.state), &shared, sinks(""));
        assert_eq!(queue(&a, 0).len(), 1);
        assert_eq!(lock(&shared.state).sinks[0].cfg.events.len(), 5);
        reconfigure(&mut lock(&shared.state), &shared, Vec::new());
        assert!(lock(&shared.state).sinks.is_empty());
        assert_eq!(shared.removed.load(Ordering::Relaxed), 1);
        let path = lock(&shared.state).journal.path();
        assert!(!path.exists(), "no sink, nothing spooled");
    }

    #[test]
    fn the_rate_limit_counts_monotonic_time_so_a_clock_stepped_back_holds_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut a = acceptor(d.path(), 10);
        a.start(sinks("rate_limit = 1\nrate_window = \"5m\"\n"));
        let shared = a.shared.clone();
        let mut st = lock(&shared.state);
        let mut records = Vec::new();
        let wall = 1_800_000_000_000;
        let mut e = restart(1);
        e.ts_ms = wall;
        a.accept(&mut st, &e, NotifyEvent::Restart, 10_000, &mut records);
        // The wall clock steps back an hour (an NTP fix); six minutes of real time later the
        // window has passed, whatever the events' timestamps say.
        e.ts_ms = wall - 3_600_000 + 360_000;
        a.accept(&mut st, &e, NotifyEvent::Restart, 370_000, &mut records);
        assert_eq!(st.sinks[0].queue.len(), 2, "the second alert was held back");
        assert_eq!(st.sinks[0].st.held_back, 0);
        // Within the window (monotonic), it is held back, whatever the wall clock says.
        e.ts_ms = wall + 86_400_000;
        a.accept(&mut st, &e, NotifyEvent::Restart, 370_001, &mut records);
        assert_eq!(st.sinks[0].st.held_back, 1);
    }

    #[test]
    fn a_renamed_sink_with_the_same_type_and_url_keeps_its_queue_and_a_gone_one_is_counted() {
        let d = tempfile::tempdir().unwrap();
        let mut a = acceptor(d.path(), 10);
        a.start(sinks(""));
        take(&mut a, &[(restart(1), NotifyEvent::GiveUp)]);
        let shared = a.shared.clone();
        let renamed: Vec<NotifyConfig> = sinks("")
            .into_iter()
            .map(|mut c| {
                c.name = "ops-hook".into();
                c
            })
            .collect();
        reconfigure(&mut lock(&shared.state), &shared, renamed.clone());
        assert_eq!(lock(&shared.state).sinks[0].cfg.name, "ops-hook");
        assert_eq!(queue(&a, 0), ["restart 1"]);
        assert_eq!(shared.removed.load(Ordering::Relaxed), 0);
        // The journal was rewritten under the new name: a restart finds the alert there.
        let mut next = acceptor(d.path(), 10);
        next.start(renamed);
        assert_eq!(queue(&next, 0), ["restart 1"]);
        // Renamed and moved to another URL: a different sink; the old queue is dropped, counted.
        let moved: Vec<NotifyConfig> = sinks("")
            .into_iter()
            .map(|mut c| {
                c.name = "other".into();
                c.url = crate::net::Url::parse("http://127.0.0.1:10/h").ok();
                c
            })
            .collect();
        reconfigure(&mut lock(&shared.state), &shared, moved);
        assert!(queue(&a, 0).is_empty());
        assert_eq!(shared.removed.load(Ordering::Relaxed), 1);
    }

    fn url(port: u16) -> Option<Url> {
        Url::parse(&format!("http://127.0.0.1:{port}/h")).ok()
    }

    fn with_name_and_port(name: &str, port: u16) -> Vec<NotifyConfig> {
        sinks("")
            .into_iter()
            .map(|mut c| {
                c.name = name.into();
                c.url = url(port);
                c
            })
            .collect()
    }

    fn on_disk(dir: &Path) -> Vec<String> {
        let mut j = Journal::new(dir);
        let l = j.load(1000).unwrap();
        l.spooled
            .values()
            .flat_map(|q| q.alerts.iter().map(|a| a.message.clone()))
            .collect()
    }

    #[test]
    fn a_failed_spool_write_is_said_and_the_spool_rewritten_from_memory_before_any_append() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let mut a = acceptor(d.path(), 10);
        a.start(sinks(""));
        take(&mut a, &[(restart(1), NotifyEvent::Restart)]);
        let spool = d.path().join(crate::report::spool::SPOOL_DIR);
        let mode = |m: u32| std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(m));
        // The append fails (the disk, say), and so does the rewrite (refused: the directory
        // is world-writable, which even root cannot get past).
        lock(&a.shared.state).journal.fail_writes();
        mode(0o757).unwrap();
        take(&mut a, &[(restart(2), NotifyEvent::Restart)]);
        let said = {
            let st = lock(&a.shared.state);
            assert!(st.journal.is_stale());
            st.sinks[0].st.last_error.clone().unwrap()
        };
        assert!(said.contains("cannot write the spool"), "{said}");
        assert!(said.contains("kept in memory"), "{said}");
        take(&mut a, &[(restart(3), NotifyEvent::Restart)]);
        assert_eq!(
            on_disk(d.path()),
            ["restart 1"],
            "nothing appended meanwhile"
        );
        // The directory is usable again: the next write rewrites the spool from memory.
        mode(0o750).unwrap();
        take(&mut a, &[(restart(4), NotifyEvent::Restart)]);
        assert!(lock(&a.shared.state).spool_error.is_none());
        take(&mut a, &[(restart(5), NotifyEvent::Restart)]);
        assert_eq!(
            on_disk(d.path()),
            [
                "restart 1",
                "restart 2",
                "restart 3",
                "restart 4",
                "restart 5"
            ]
        );
    }

    #[test]
    fn a_sink_renamed_while_the_agent_was_stopped_finds_its_queue_at_the_next_start() {
        let d = tempfile::tempdir().unwrap();
        let mut a = acceptor(d.path(), 10);
        a.start(with_name_and_port("hook", 9));
        take(&mut a, &[(restart(1), NotifyEvent::GiveUp)]);
        // Renamed in the config while stopped; type and URL unchanged.
        let mut next = acceptor(d.path(), 10);
        next.start(with_name_and_port("ops-hook", 9));
        assert_eq!(queue(&next, 0), ["restart 1"]);
        assert_eq!(next.shared.removed.load(Ordering::Relaxed), 0);
        // And it stays with it (rewritten under the new name) across the next start.
        let mut again = acceptor(d.path(), 10);
        again.start(with_name_and_port("ops-hook", 9));
        assert_eq!(queue(&again, 0), ["restart 1"]);
        // Renamed and moved to another URL: another sink; the queue is counted and said lost.
        let mut moved = acceptor(d.path(), 10);
        moved.start(with_name_and_port("other", 10));
        assert!(queue(&moved, 0).is_empty());
        assert_eq!(moved.shared.removed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_reply_from_the_url_a_reload_replaced_counts_as_a_delivery_or_not_at_all() {
        let d = tempfile::tempdir().unwrap();
        let mut a = acceptor(d.path(), 10);
        a.start(with_name_and_port("hook", 9));
        let events: Vec<_> = (1..=3)
            .map(|n| (restart(n), NotifyEvent::Restart))
            .collect();
        take(&mut a, &events);
        let shared = a.shared.clone();
        let mut st = lock(&shared.state);
        let job = next_job(&st, clock::mono_now()).unwrap();
        // While the attempt to port 9 runs, a reload points the sink at port 10.
        reconfigure(&mut st, &shared, with_name_and_port("hook", 10));
        for outcome in [
            Outcome::Refused { status: 404 },
            Outcome::Redirected { status: 301 },
            Outcome::Retry {
                error: "HTTP 503".into(),
                after_ms: Some(600_000),
            },
        ] {
            record(&mut st, &job, outcome, 0.5);
            let s = &st.sinks[0];
            assert_eq!(s.queue.len(), 3, "the alert is kept for the new URL");
            assert_eq!((s.failures, s.next_ms, s.st.dropped), (0, 0, 0));
            assert_eq!(s.st.last_error, None);
        }
        // A 2xx from the old URL: the alert did arrive there; it is not sent again.
        record(&mut st, &job, Outcome::Delivered, 0.5);
        assert_eq!((st.sinks[0].queue.len(), st.sinks[0].st.delivered), (2, 1));
        // The new URL's own refusal is its own: dropped and counted.
        let job = next_job(&st, clock::mono_now()).unwrap();
        record(&mut st, &job, Outcome::Refused { status: 404 }, 0.5);
        assert_eq!((st.sinks[0].queue.len(), st.sinks[0].st.dropped), (1, 1));
        drop(st);
        assert_eq!(on_disk(d.path()), ["restart 3"]);
    }
}
