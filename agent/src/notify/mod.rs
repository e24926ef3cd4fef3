//! `[[notify]]`: alerts to webhooks and Slack-compatible chats, nothing lost, nothing sent twice.
//!
//! The data path: the event log forwards each event to the `Inbox` (a channel bounded by a
//! count, allocated as it fills; never blocks the emitting thread), the `notify` thread turns
//! the events a sink asked for into `payload::Alert`s (rate-limited per app and sink, with the
//! tail of the app's error log when asked) and appends them to the journal
//! (`<state_dir>/spool/notify.jsonl`, 0600, fsynced) at once; the `notify-send` thread delivers
//! each sink's alerts in order through the shared blocking client (`crate::net`) and journals
//! each one that leaves (`journal`).
//!
//! Invariants:
//! - The watch loop never waits on a sink, and neither does acceptance: only `notify-send`
//!   talks to the network, so an alert is on disk within milliseconds of its event even while
//!   an attempt hangs, and a stop (or a SIGKILL) loses none that the inbox had taken.
//! - An alert leaves the spool only after a 2xx (delivered) or a refusal for good (a 4xx other
//!   than 408/429: dropped, counted, one error log); network errors, 3xx (never followed; an
//!   error log asks for the URL to be fixed), 5xx and 429 are retried with
//!   backoff (`retry`), so an outage or an agent restart delays alerts, never loses them. A 2xx
//!   lost with a crash may send one alert twice; every alert carries an `id` for that case.
//! - Bounded: beyond `Options::queue_cap` alerts per sink the oldest is dropped and counted,
//!   at accept and when the journal is replayed at start.
//! - The URL is logged and shown only as `Url::redacted` (scheme and host); bodies and headers
//!   are never logged.

mod journal;
pub mod logtail;
pub mod payload;
pub mod retry;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::clock;
use crate::config::{NotifyConfig, NotifyEvent};
use crate::report::events::{Event, Forward};
pub use crate::report::state::SinkStatus;
pub use payload::Origin;

/// Finds an app's PM2 error log (`pm_err_log_path`) by app name: the daemon answers from the
/// last process list it saw.
pub type LogPaths = Arc<dyn Fn(&str) -> Option<PathBuf> + Send + Sync>;

/// Tunables that are not in the config file.
#[derive(Debug, Clone)]
pub struct Options {
    pub limits: crate::net::Limits,
    /// Alerts kept per sink before the oldest is dropped.
    pub queue_cap: usize,
    /// How long a stop may spend delivering what is due before it leaves the rest spooled.
    pub stop_deadline: Duration,
    /// Who may own an error log whose lines an alert carries: the agent's user by default; the
    /// daemon sets PM2's user (PM2_HOME's owner). Any other owner's file is never read.
    pub log_owners: Vec<u32>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            limits: crate::net::Limits {
                connect: Duration::from_secs(2),
                total: Duration::from_secs(5),
                max_body: 64 * 1024,
            },
            queue_cap: 1000,
            stop_deadline: Duration::from_secs(2),
            log_owners: vec![crate::sys::privilege::euid()],
        }
    }
}

enum Msg {
    Event(Box<Event>, NotifyEvent),
    Config(Vec<NotifyConfig>),
    Stop,
}

/// Events in flight to the notify thread before the newest are dropped (and counted).
const INBOX_CAP: usize = 10_000;

/// The event log's forward: hands the events a sink may want to the notify thread.
///
/// An unbounded channel with its own count, not `sync_channel(INBOX_CAP)`: that one allocates
/// and writes all its slots at once (320 KB, most of the agent's heap), this one a block of 31
/// as they fill. Only events count against the cap; a reload or a stop is always taken.
#[derive(Debug)]
pub struct Inbox {
    tx: Sender<Msg>,
    /// Events sent and not yet taken by the notify thread.
    waiting: Arc<AtomicUsize>,
    dropped: AtomicU64,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl Forward for Inbox {
    fn forward(&self, e: &Event) {
        let Some(what) = payload::notify_event(e.kind) else {
            return;
        };
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= INBOX_CAP {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.tx.send(Msg::Event(Box::new(e.clone()), what)).is_err() {
            // The notify thread has ended (after a stop): nothing takes events any more.
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The running notify threads.
pub struct Notify {
    inbox: Arc<Inbox>,
    accept: JoinHandle<()>,
    send: JoinHandle<()>,
    shared: Arc<worker::Shared>,
    deadline: Duration,
}

/// The sinks' counters, and the alerts lost before any sink took them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Board {
    pub sinks: Vec<SinkStatus>,
    /// Events the full inbox turned away, alerts dropped with a sink a reload removed (or that
    /// a start found no sink for) and alerts in unreadable journal lines.
    pub lost: u64,
}

impl Notify {
    /// Starts the threads with `sinks`; alerts spooled by a previous run are sent first.
    pub fn start(
        sinks: Vec<NotifyConfig>,
        state_dir: &Path,
        origin: Origin,
        logs: LogPaths,
        opts: Options,
    ) -> std::io::Result<Notify> {
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(worker::Shared::new(state_dir));
        let deadline = opts.stop_deadline;
        let limits = opts.limits;
        let acceptor = worker::Acceptor::new(shared.clone(), origin, logs, opts);
        let taken = waiting.clone();
        let accept = std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || acceptor.run(sinks, &rx, &taken))?;
        let s = shared.clone();
        let send = std::thread::Builder::new()
            .name("notify-send".into())
            .spawn(move || worker::send_loop(&s, &limits))?;
        Ok(Notify {
            inbox: Arc::new(Inbox {
                tx,
                waiting,
                dropped: AtomicU64::new(0),
            }),
            accept,
            send,
            shared,
            deadline,
        })
    }

    /// What the event log forwards to.
    pub fn inbox(&self) -> Arc<Inbox> {
        self.inbox.clone()
    }

    /// A reload: a sink keeps its queue and counters when its name is kept, or its type and URL.
    pub fn reconfigure(&self, sinks: Vec<NotifyConfig>) {
        let _ = self.inbox.tx.send(Msg::Config(sinks));
    }

    /// `status` for another thread (the pulse reads it at each beat).
    pub fn board_reader(&self) -> Box<dyn Fn() -> Board + Send> {
        let inbox = self.inbox.clone();
        let shared = self.shared.clone();
        Box::new(move || board_of(&inbox, &shared))
    }

    /// Every sink's counters as of the threads' last step, and the agent-level loss count.
    pub fn status(&self) -> Board {
        board_of(&self.inbox, &self.shared)
    }

    /// Takes what is already in the inbox (into the journal, without waiting on the network),
    /// then lets the sender deliver what is due for at most the stop deadline; returns within
    /// the deadline and half a second. An attempt still in flight then is abandoned: its alert
    /// is still in the journal, so it is sent again at the next start (a duplicate at worst).
    pub fn stop(self) {
        let until = clock::mono_now() + self.deadline.as_millis() as u64 + 500;
        let _ = self.inbox.tx.send(Msg::Stop);
        let done = |j: &JoinHandle<()>| j.is_finished();
        while !(done(&self.accept) && done(&self.send)) && clock::mono_now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !done(&self.accept) {
            tracing::warn!(message = "The notify thread did not take the last events in time.");
        } else if !done(&self.send) {
            tracing::warn!(
                message = "A notify delivery was still running at stop; its alert stays spooled."
            );
        }
    }
}

fn board_of(inbox: &Inbox, shared: &worker::Shared) -> Board {
    Board {
        sinks: crate::sync::lock(&shared.status).clone(),
        lost: inbox.dropped.load(Ordering::Relaxed) + shared.removed.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::events::Kind;

    fn inbox() -> (Inbox, mpsc::Receiver<Msg>) {
        let (tx, rx) = mpsc::channel();
        let inbox = Inbox {
            tx,
            waiting: Arc::new(AtomicUsize::new(0)),
            dropped: AtomicU64::new(0),
        };
        (inbox, rx)
    }

    #[test]
    fn a_full_inbox_turns_away_the_newest_events_and_counts_them() {
        let (inbox, rx) = inbox();
        let restart = Event::new(Kind::Restart, Some("api"), "restarted");
        for _ in 0..INBOX_CAP + 3 {
            inbox.forward(&restart);
        }
        assert_eq!(inbox.dropped.load(Ordering::Relaxed), 3);
        assert_eq!(rx.try_iter().count(), INBOX_CAP);
        // What the notify thread takes frees its place: the next event is kept again.
        inbox.waiting.fetch_sub(INBOX_CAP, Ordering::AcqRel);
        inbox.forward(&restart);
        assert_eq!(inbox.dropped.load(Ordering::Relaxed), 3);
        assert_eq!(rx.try_iter().count(), 1);
    }

    #[test]
    fn the_notify_thread_frees_the_places_of_the_events_it_takes() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Origin {
            host: "box".into(),
            instance_id: None,
        };
        let logs: LogPaths = Arc::new(|_: &str| None);
        let n = Notify::start(vec![], dir.path(), origin, logs, Options::default()).unwrap();
        let inbox = n.inbox();
        let restart = Event::new(Kind::Restart, Some("api"), "restarted");
        for _ in 0..50 {
            inbox.forward(&restart);
        }
        let until = clock::mono_now() + 5_000;
        while inbox.waiting.load(Ordering::Acquire) > 0 && clock::mono_now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(inbox.waiting.load(Ordering::Acquire), 0);
        assert_eq!(n.status().lost, 0);
        n.stop();
    }

    #[test]
    fn events_no_sink_can_want_are_not_queued() {
        let (inbox, rx) = inbox();
        inbox.forward(&Event::new(Kind::StateChange, Some("api"), "healthy"));
        assert_eq!(rx.try_iter().count(), 0);
        assert_eq!(inbox.waiting.load(Ordering::Relaxed), 0);
    }
}
