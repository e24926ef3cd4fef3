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

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
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
        let ctl = Arc::new(Ctl::default());
        let thread_ctl = ctl.clone();
        let thread = std::thread::Builder::new()
            .name("pm2-bus".into())
            .spawn(move || run(&paths, &thread_ctl, &on_event))?;
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

fn run(paths: &Pm2Paths, ctl: &Ctl, on_event: &dyn Fn(BusEvent)) {
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
        let reason = read_events(stream, on_event);
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

fn read_events(mut stream: UnixStream, on_event: &dyn Fn(BusEvent)) -> String {
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
