//! `[[notify]]`: alerts to webhooks and Slack-compatible chats, nothing lost, nothing sent twice.
//!
//! The data path: the event log forwards each event to the `Inbox` (a bounded channel; never
//! blocks the emitting thread), the one `notify` thread turns the events a sink asked for into
//! `payload::Alert`s (rate-limited per app and sink, with the tail of the app's error log when
//! asked), spools them (`<state_dir>/spool/notify.json`, 0600) BEFORE the first attempt, and
//! delivers each sink's alerts in order through the shared blocking client (`crate::net`).
//!
//! Invariants:
//! - The watch loop never waits on a sink: only the `notify` thread talks to the network.
//! - An alert leaves the spool only after a 2xx (delivered) or a refusal for good (any other
//!   4xx: dropped, counted, one error log); network errors, 5xx and 429 are retried with
//!   backoff (`retry`), so an outage or an agent restart delays alerts, never loses them. A 2xx
//!   lost with a crash may send one alert twice; every alert carries an `id` for that case.
//! - Bounded: beyond `Options::queue_cap` alerts per sink the oldest is dropped and counted.
//! - The URL is logged and shown only as `Url::redacted` (scheme and host); bodies and headers
//!   are never logged.

pub mod logtail;
pub mod payload;
pub mod retry;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
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

/// The running notify thread.
pub struct Notify {
    inbox: Arc<Inbox>,
    join: JoinHandle<()>,
    status: Arc<Mutex<Vec<SinkStatus>>>,
    deadline: Duration,
}

impl Notify {
    /// Starts the thread with `sinks`; alerts spooled by a previous run are sent first.
    pub fn start(
        sinks: Vec<NotifyConfig>,
        state_dir: &Path,
        origin: Origin,
        logs: LogPaths,
        opts: Options,
    ) -> std::io::Result<Notify> {
        let (tx, rx) = mpsc::sync_channel(INBOX_CAP);
        let status = Arc::new(Mutex::new(Vec::new()));
        let deadline = opts.stop_deadline;
        let worker = worker::Worker::new(state_dir, origin, logs, opts, status.clone());
        let join = std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || worker.run(sinks, &rx))?;
        Ok(Notify {
            inbox: Arc::new(Inbox {
                tx,
                dropped: AtomicU64::new(0),
            }),
            join,
            status,
            deadline,
        })
    }

    /// What the event log forwards to.
    pub fn inbox(&self) -> Arc<Inbox> {
        self.inbox.clone()
    }

    /// A reload: sinks are matched by name; a kept sink keeps its queue and counters.
    pub fn reconfigure(&self, sinks: Vec<NotifyConfig>) {
        let _ = self.inbox.tx.send(Msg::Config(sinks));
    }

    /// Every sink's counters, as of the thread's last step.
    pub fn status(&self) -> Vec<SinkStatus> {
        let mut s = crate::sync::lock(&self.status).clone();
        let lost = self.inbox.dropped.load(Ordering::Relaxed);
        if lost > 0 {
            for x in &mut s {
                x.dropped += lost;
            }
        }
        s
    }

    /// Delivers what is due within the stop deadline, leaves the rest spooled, and waits for
    /// the thread that long (and a little). A request still in flight then is abandoned: its
    /// alert is still in the spool, so it is sent again at the next start (a duplicate at worst, never a loss).
    pub fn stop(self) {
        let _ = self.inbox.tx.send(Msg::Stop);
        let until = clock::mono_now() + self.deadline.as_millis() as u64 + 500;
        while !self.join.is_finished() && clock::mono_now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.join.is_finished() {
            let _ = self.join.join();
        } else {
            tracing::warn!(
                message = "The notify thread did not stop in time; its alerts stay spooled."
            );
        }
    }
}
