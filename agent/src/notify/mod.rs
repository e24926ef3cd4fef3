//! `[[notify]]`: alerts to webhooks and Slack-compatible chats, nothing lost, nothing sent twice.
//!
//! The data path: the event log forwards each event to the `Inbox` (a bounded channel; never
//! blocks the emitting thread), the `notify` thread turns the events a sink asked for into
//! `payload::Alert`s (rate-limited per app and sink, with the tail of the app's error log when
//! asked) and appends them to the journal (`<state_dir>/spool/notify.jsonl`, 0600, fsynced) at
//! once; the `notify-send` thread delivers each sink's alerts in order through the shared
//! blocking client (`crate::net`) and journals each one that leaves (`journal`).
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
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
#[derive(Debug)]
pub struct Inbox {
    tx: SyncSender<Msg>,
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
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Event(Box::new(e.clone()), what))
        {
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
        let (tx, rx) = mpsc::sync_channel(INBOX_CAP);
        let shared = Arc::new(worker::Shared::new(state_dir));
        let deadline = opts.stop_deadline;
        let limits = opts.limits;
        let acceptor = worker::Acceptor::new(shared.clone(), origin, logs, opts);
        let accept = std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || acceptor.run(sinks, &rx))?;
        let s = shared.clone();
        let send = std::thread::Builder::new()
            .name("notify-send".into())
            .spawn(move || worker::send_loop(&s, &limits))?;
        Ok(Notify {
            inbox: Arc::new(Inbox {
                tx,
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
