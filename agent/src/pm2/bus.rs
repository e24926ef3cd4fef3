//! Subscriber to PM2's event bus on `pub.sock`.
//!
//! Owns: one background thread holding one connection, reconnecting with backoff
//! (100 ms doubling to 5 s, reset after a successful connect).
//!
//! Invariants:
//! - Only `process:event` messages are decoded; every other topic (`log:out`, `log:err`, ...) is
//!   skipped by comparing the topic bytes, without parsing its JSON (logs are the bulk of traffic).
//! - The payload's `process` is PM2's `pm2_env`; only name, pm_id, status and restart_time are
//!   decoded, `env` is skipped by serde and never held.
//! - Never spawns a daemon: a missing socket is retried, quietly, until [`Bus::stop`].
//! - `stop` returns once the thread has exited; `on_event` is never called after that.
//! - [`Link`] says whether the bus is connected and counts connects, disconnects and events
//!   (bumped before `on_event` runs): a reader that sees the same [`Mark`] twice knows it was
//!   connected all along in between and that no process event arrived. The agent uses that to
//!   skip asking PM2 for its process list when nothing can have changed.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, warn};

use crate::sync::lock;

use super::codec::Decoder;
use super::types::{BusEvent, Pm2Paths, RawBusEvent};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const TOPIC: &str = "process:event";
/// The bus topic of `pm2 kill`; also the `event` of the `BusEvent` it is passed on as.
pub const KILL_TOPIC: &str = "pm2:kill";

/// What the bus saw, shared with its readers: connection epochs and event counts.
#[derive(Debug, Default)]
pub struct Link {
    /// Bumped on every connect and every disconnect: odd while connected.
    epoch: AtomicU64,
    /// Bumped on every `process:event` and `pm2:kill`, before `on_event` sees it.
    events: AtomicU64,
}

/// A point in the bus's history: the connection epoch and the event count then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    epoch: u64,
    events: u64,
}

impl Link {
    /// Where the bus is now, or `None` while it is not connected (nothing it says can be
    /// trusted to be complete then).
    pub fn mark(&self) -> Option<Mark> {
        let epoch = self.epoch.load(Ordering::SeqCst);
        let events = self.events.load(Ordering::SeqCst);
        (epoch % 2 == 1).then_some(Mark { epoch, events })
    }

    /// Whether the bus stayed connected since `then` and reported no process event.
    pub fn quiet_since(&self, then: Mark) -> bool {
        self.mark() == Some(then)
    }

    fn connected(&self, up: bool) {
        let now = self.epoch.load(Ordering::SeqCst);
        if (now % 2 == 1) != up {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn event(&self) {
        self.events.fetch_add(1, Ordering::SeqCst);
    }
}

pub struct Bus {
    ctl: Arc<Ctl>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Ctl {
    state: Mutex<CtlState>,
    wake: Condvar,
}

#[derive(Default)]
struct CtlState {
    stopped: bool,
    /// A clone of the live stream, so `stop` can unblock the reader.
    stream: Option<UnixStream>,
}

impl Bus {
    pub fn spawn(paths: Pm2Paths, on_event: impl Fn(BusEvent) + Send + 'static) -> io::Result<Bus> {
        Bus::spawn_with_link(paths, Arc::new(Link::default()), on_event)
    }

    /// Like `spawn`, keeping `link` up to date.
    pub fn spawn_with_link(
        paths: Pm2Paths,
        link: Arc<Link>,
        on_event: impl Fn(BusEvent) + Send + 'static,
    ) -> io::Result<Bus> {
        let ctl = Arc::new(Ctl::default());
        let thread_ctl = ctl.clone();
        let thread = std::thread::Builder::new()
            .name("pm2-bus".into())
            .spawn(move || run(&paths, &thread_ctl, &link, &on_event))?;
        Ok(Bus {
            ctl,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        {
            let mut st = lock(&self.ctl.state);
            st.stopped = true;
            if let Some(s) = st.stream.take() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        self.ctl.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(paths: &Pm2Paths, ctl: &Ctl, link: &Link, on_event: &dyn Fn(BusEvent)) {
    let mut backoff = BACKOFF_MIN;
    let mut logged_down = false;
    loop {
        let stream = match UnixStream::connect(&paths.pubsub) {
            Ok(s) => s,
            Err(error) => {
                if !logged_down {
                    debug!(message = "PM2 bus not reachable; retrying.", path = %paths.pubsub.display(), %error);
                    logged_down = true;
                }
                if sleep_or_stop(ctl, backoff) {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        {
            let mut st = lock(&ctl.state);
            if st.stopped {
                return;
            }
            match stream.try_clone() {
                Ok(c) => st.stream = Some(c),
                Err(error) => {
                    warn!(message = "Cannot clone the PM2 bus socket.", %error);
                    drop(st);
                    if sleep_or_stop(ctl, backoff) {
                        return;
                    }
                    continue;
                }
            }
        }
        debug!(message = "PM2 bus connected.", path = %paths.pubsub.display());
        backoff = BACKOFF_MIN;
        logged_down = false;
        link.connected(true);
        let reason = read_events(stream, link, on_event);
        link.connected(false);
        let stopped = {
            let mut st = lock(&ctl.state);
            st.stream = None;
            st.stopped
        };
        if stopped {
            return;
        }
        debug!(message = "PM2 bus disconnected.", reason = %reason);
        if sleep_or_stop(ctl, backoff) {
            return;
        }
    }
}

/// Sleeps `d` unless stopped first; returns whether the bus is stopped.
fn sleep_or_stop(ctl: &Ctl, d: Duration) -> bool {
    let st = lock(&ctl.state);
    let (st, _) = ctl
        .wake
        .wait_timeout_while(st, d, |s| !s.stopped)
        .unwrap_or_else(|e| e.into_inner());
    st.stopped
}

fn read_events(mut stream: UnixStream, link: &Link, on_event: &dyn Fn(BusEvent)) -> String {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return "closed by the daemon".into(),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return format!("read failed: {e}"),
        };
        decoder.feed(&buf[..n]);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    // `pm2 kill` says so before the daemon exits: the daemon was stopped on
                    // purpose, which is not a crash to repair.
                    if frame.len() == 2 && frame[0].is_str(KILL_TOPIC) {
                        link.event();
                        on_event(BusEvent {
                            event: KILL_TOPIC.to_string(),
                            name: String::new(),
                            pm_id: 0,
                            manually: true,
                            at_ms: 0,
                            status: None,
                            restart_time: None,
                        });
                        continue;
                    }
                    if frame.len() != 2 || !frame[0].is_str(TOPIC) {
                        continue;
                    }
                    // Counted even when undecodable: something happened to some process.
                    link.event();
                    let Some(json) = frame[1].as_json() else {
                        continue;
                    };
                    match serde_json::from_slice::<RawBusEvent>(json).map(RawBusEvent::into_event) {
                        Ok(Some(ev)) => on_event(ev),
                        Ok(None) => debug!(message = "PM2 bus event without a pm_id ignored."),
                        Err(error) => {
                            debug!(message = "Undecodable PM2 bus event ignored.", %error)
                        }
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    warn!(message = "PM2 bus sent an undecodable frame; reconnecting.", %error);
                    return format!("protocol error: {error}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bus_never_connected_vouches_for_nothing() {
        let link = Link::default();
        assert_eq!(link.mark(), None);
    }

    #[test]
    fn a_connected_silent_bus_stays_quiet() {
        let link = Link::default();
        link.connected(true);
        let m = link.mark().unwrap();
        assert!(link.quiet_since(m));
    }

    #[test]
    fn any_event_ends_the_quiet() {
        let link = Link::default();
        link.connected(true);
        let m = link.mark().unwrap();
        link.event();
        assert!(!link.quiet_since(m));
    }

    #[test]
    fn a_reconnect_ends_the_quiet_even_without_events() {
        // Messages sent while the bus was away are lost: the list must be asked for again.
        let link = Link::default();
        link.connected(true);
        let m = link.mark().unwrap();
        link.connected(false);
        assert!(!link.quiet_since(m));
        link.connected(true);
        assert!(!link.quiet_since(m));
        assert!(link.mark().is_some());
    }
}
