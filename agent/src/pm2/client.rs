//! The request/reply client for PM2's `rpc.sock`.
//!
//! Owns: one kept Unix stream to the daemon, the reader thread that dispatches replies by id, and
//! the reconnect policy.
//!
//! Invariants:
//! - Never spawns a daemon or any process: a missing or refusing socket is [`Pm2Error::DaemonDown`].
//! - Requests go out only through [`codec::encode_call`]; writes are serialized by a mutex and use
//!   `MSG_NOSIGNAL`. A failed or timed-out write drops the connection, so a partial frame is never
//!   followed by another one on the same stream.
//! - Replies are matched by id (the daemon answers out of order). When the connection drops, every
//!   waiting caller gets [`Pm2Error::Disconnected`] at once and no new caller can register on it.
//! - The generation bumps on every connect. Calls that take a pm_id also take the generation the
//!   pm_id was read under and fail with [`Pm2Error::Reconnected`] when it differs: the daemon may
//!   have been restarted and renumbered its processes.
//! - After a failed connect, further calls within [`RECONNECT_BACKOFF`] fail fast with
//!   `DaemonDown` without touching the socket.
//! - Reply bodies are decoded into typed shapes that skip `pm2_env.env`; they are never logged.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::net::SendFlags;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;
use tracing::{debug, warn};

use crate::sync::lock;

use super::codec::{self, Decoder, EmptyObject};
use super::types::{Pm2Error, Pm2Paths, RawEntry, Reply, Snapshot};

/// Minimum time between two connect attempts after one failed.
pub const RECONNECT_BACKOFF: Duration = Duration::from_millis(200);

const READ_CHUNK: usize = 64 * 1024;

/// A stalled daemon still has its listen backlog; once that is full a blocking connect would
/// wait forever, so connects are bounded.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Connects to a Unix stream socket within `timeout`.
fn connect(path: &std::path::Path, timeout: Duration) -> io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    s.connect_timeout(&SockAddr::unix(path)?, timeout)?;
    s.set_nonblocking(false)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(s)))
}

/// Shared across threads (Send + Sync); hold it in an `Arc`. Connects lazily on the first call.
pub struct Client {
    paths: Pm2Paths,
    generation: AtomicU64,
    next_id: AtomicU64,
    id_prefix: String,
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    conn: Option<Arc<Conn>>,
    last_failure: Option<ConnectFailure>,
}

struct ConnectFailure {
    at: Instant,
    kind: io::ErrorKind,
    message: String,
}

struct Conn {
    generation: u64,
    stream: UnixStream,
    write_lock: Mutex<()>,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    closed: bool,
    waiters: HashMap<String, SyncSender<Vec<u8>>>,
}

#[derive(Serialize)]
struct RestartArg {
    id: u32,
    env: EmptyObject,
}

#[derive(Serialize)]
struct NotifyArg {
    id: u32,
    action_name: &'static str,
    manually: bool,
}

impl Client {
    pub fn new(paths: Pm2Paths) -> Client {
        Client {
            paths,
            generation: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            id_prefix: format!("pmguard-{}:", std::process::id()),
            slot: Mutex::new(Slot::default()),
        }
    }

    pub fn paths(&self) -> &Pm2Paths {
        &self.paths
    }

    /// Bumps on every (re)connect; 0 before the first one.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn ping(&self, timeout: Duration) -> Result<(), Pm2Error> {
        self.call::<_, IgnoredAny>("ping", &EmptyObject {}, None, timeout)?;
        Ok(())
    }

    pub fn version(&self, timeout: Duration) -> Result<String, Pm2Error> {
        let (v, _) = self.call::<_, String>("getVersion", &EmptyObject {}, None, timeout)?;
        v.ok_or_else(|| Pm2Error::Protocol {
            detail: "getVersion reply has no result".into(),
        })
    }

    /// `getMonitorData`: every process, tagged with the generation of the connection it came on.
    pub fn list(&self, timeout: Duration) -> Result<Snapshot, Pm2Error> {
        let (raw, generation) =
            self.call::<_, Vec<RawEntry>>("getMonitorData", &EmptyObject {}, None, timeout)?;
        let raw = raw.ok_or_else(|| Pm2Error::Protocol {
            detail: "getMonitorData reply has no result".into(),
        })?;
        let processes = raw.into_iter().filter_map(RawEntry::into_entry).collect();
        Ok(Snapshot::new(generation, processes))
    }

    /// `restartProcessId {"id":N,"env":{}}` (an empty env leaves the app's environment unchanged).
    pub fn restart(&self, pm_id: u32, generation: u64, timeout: Duration) -> Result<(), Pm2Error> {
        let arg = RestartArg {
            id: pm_id,
            env: EmptyObject {},
        };
        self.call::<_, IgnoredAny>("restartProcessId", &arg, Some(generation), timeout)?;
        Ok(())
    }

    /// `notifyByProcessId`: makes the daemon emit the `restart` bus event the CLI emits, so other
    /// PM2 clients see the restart as manual.
    pub fn notify_restart(&self, pm_id: u32, timeout: Duration) -> Result<(), Pm2Error> {
        let arg = NotifyArg {
            id: pm_id,
            action_name: "restart",
            manually: true,
        };
        self.call::<_, IgnoredAny>("notifyByProcessId", &arg, None, timeout)?;
        Ok(())
    }

    pub fn stop(&self, pm_id: u32, generation: u64, timeout: Duration) -> Result<(), Pm2Error> {
        self.call::<_, IgnoredAny>("stopProcessId", &pm_id, Some(generation), timeout)?;
        Ok(())
    }

    pub fn start(&self, pm_id: u32, generation: u64, timeout: Duration) -> Result<(), Pm2Error> {
        self.call::<_, IgnoredAny>("startProcessId", &pm_id, Some(generation), timeout)?;
        Ok(())
    }

    /// One round trip. Returns the reply's first argument (if any) and the connection generation.
    fn call<A: Serialize, R: DeserializeOwned>(
        &self,
        method: &'static str,
        arg: &A,
        expected_generation: Option<u64>,
        timeout: Duration,
    ) -> Result<(Option<R>, u64), Pm2Error> {
        let deadline = Instant::now() + timeout;
        let mut retried = false;
        loop {
            let (conn, fresh) = self.connection()?;
            if expected_generation.is_some_and(|g| g != conn.generation) {
                return Err(Pm2Error::Reconnected { method });
            }
            let id = format!(
                "{}{}",
                self.id_prefix,
                self.next_id.fetch_add(1, Ordering::Relaxed)
            );
            let Some(rx) = conn.register(&id) else {
                // Closed between the liveness check and now: nothing was sent, try a fresh one.
                if !fresh && !retried {
                    retried = true;
                    continue;
                }
                return Err(Pm2Error::Disconnected { method });
            };
            let frame = codec::encode_call(method, arg, &id);
            if let Err(error) = conn.send(&frame, deadline) {
                conn.unregister(&id);
                self.drop_conn(&conn, "write failed", &error);
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    return Err(Pm2Error::Timeout {
                        method,
                        after: timeout,
                    });
                }
                // The daemon went away since the last call (EPIPE on a stale connection): the
                // request was not processed, so one retry on a new connection is safe. It reports
                // DaemonDown, or Reconnected for pm_id calls.
                if !fresh && !retried {
                    retried = true;
                    continue;
                }
                return Err(Pm2Error::Disconnected { method });
            }
            return self.await_reply(&conn, &rx, &id, method, timeout, deadline);
        }
    }

    /// Waits for the reply to request `id` until `deadline`.
    fn await_reply<R: DeserializeOwned>(
        &self,
        conn: &Arc<Conn>,
        rx: &mpsc::Receiver<Vec<u8>>,
        id: &str,
        method: &'static str,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<(Option<R>, u64), Pm2Error> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(remaining) {
            Ok(body) => decode_reply::<R>(method, &body).map(|r| (r, conn.generation)),
            Err(RecvTimeoutError::Timeout) => {
                conn.unregister(id);
                // The reply may be stuck half-way (a partial frame in the reader): a kept
                // connection would then mis-frame every later reply. Start clean next call.
                self.drop_conn(
                    conn,
                    "call timed out",
                    &io::Error::from(io::ErrorKind::TimedOut),
                );
                debug!(
                    message = "PM2 call timed out.",
                    method,
                    timeout_ms = timeout.as_millis() as u64
                );
                Err(Pm2Error::Timeout {
                    method,
                    after: timeout,
                })
            }
            Err(RecvTimeoutError::Disconnected) => Err(Pm2Error::Disconnected { method }),
        }
    }

    /// The live connection, or a new one. `true` when it was just made.
    fn connection(&self) -> Result<(Arc<Conn>, bool), Pm2Error> {
        let mut slot = lock(&self.slot);
        if let Some(conn) = &slot.conn {
            if conn.is_open() {
                return Ok((conn.clone(), false));
            }
            slot.conn = None;
        }
        if let Some(f) = &slot.last_failure {
            if f.at.elapsed() < RECONNECT_BACKOFF {
                return Err(Pm2Error::DaemonDown {
                    path: self.paths.rpc.clone(),
                    source: io::Error::new(f.kind, f.message.clone()),
                });
            }
        }
        let stream = match connect(&self.paths.rpc, CONNECT_TIMEOUT) {
            Ok(s) => s,
            Err(source) => {
                if slot.last_failure.is_none() {
                    debug!(message = "PM2 connect failed.", path = %self.paths.rpc.display(), error = %source);
                }
                slot.last_failure = Some(ConnectFailure {
                    at: Instant::now(),
                    kind: source.kind(),
                    message: source.to_string(),
                });
                return Err(Pm2Error::DaemonDown {
                    path: self.paths.rpc.clone(),
                    source,
                });
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let conn = Conn::start(stream, generation).map_err(|e| Pm2Error::Protocol {
            detail: format!("cannot start the PM2 reply reader: {e}"),
        })?;
        slot.last_failure = None;
        slot.conn = Some(conn.clone());
        debug!(message = "PM2 connected.", path = %self.paths.rpc.display(), generation);
        Ok((conn, true))
    }

    fn drop_conn(&self, conn: &Arc<Conn>, why: &'static str, error: &io::Error) {
        conn.close();
        let mut slot = lock(&self.slot);
        if slot.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            slot.conn = None;
        }
        debug!(message = "PM2 connection dropped.", reason = why, generation = conn.generation, %error);
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("rpc", &self.paths.rpc)
            .field("generation", &self.generation())
            .finish()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(conn) = lock(&self.slot).conn.take() {
            conn.close();
        }
    }
}

impl Conn {
    fn start(stream: UnixStream, generation: u64) -> io::Result<Arc<Conn>> {
        let read_half = stream.try_clone()?;
        let conn = Arc::new(Conn {
            generation,
            stream,
            write_lock: Mutex::new(()),
            pending: Mutex::new(Pending::default()),
        });
        let reader = conn.clone();
        std::thread::Builder::new()
            .name("pm2-rpc-reader".into())
            .spawn(move || reader.read_loop(read_half))?;
        Ok(conn)
    }

    fn is_open(&self) -> bool {
        !lock(&self.pending).closed
    }

    fn register(&self, id: &str) -> Option<mpsc::Receiver<Vec<u8>>> {
        let mut p = lock(&self.pending);
        if p.closed {
            return None;
        }
        let (tx, rx) = mpsc::sync_channel(1);
        p.waiters.insert(id.to_owned(), tx);
        Some(rx)
    }

    fn unregister(&self, id: &str) {
        lock(&self.pending).waiters.remove(id);
    }

    /// Idempotent. Dropping the senders wakes every waiter with `Disconnected`.
    fn close(&self) {
        let waiters = {
            let mut p = lock(&self.pending);
            p.closed = true;
            std::mem::take(&mut p.waiters)
        };
        drop(waiters);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn send(&self, bytes: &[u8], deadline: Instant) -> io::Result<()> {
        let _guard = lock(&self.write_lock);
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream
            .set_write_timeout(Some(remaining.max(Duration::from_millis(1))))?;
        let mut off = 0;
        while off < bytes.len() {
            // MSG_NOSIGNAL: a vanished daemon yields EPIPE, not a process-killing SIGPIPE.
            match rustix::net::send(&self.stream, &bytes[off..], SendFlags::NOSIGNAL) {
                Ok(n) => off += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn read_loop(self: Arc<Conn>, mut stream: UnixStream) {
        let mut decoder = Decoder::new();
        let mut buf = vec![0u8; READ_CHUNK];
        let reason = loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => break "closed by the daemon".to_owned(),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break format!("read failed: {e}"),
            };
            decoder.feed(&buf[..n]);
            let failed = loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => self.dispatch(frame),
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            if let Some(error) = failed {
                warn!(message = "PM2 sent an undecodable frame; reconnecting.", generation = self.generation, %error);
                break format!("protocol error: {error}");
            }
        };
        debug!(message = "PM2 reply reader stopped.", generation = self.generation, reason = %reason);
        self.close();
    }

    fn dispatch(&self, mut frame: Vec<codec::RawArg>) {
        // Reply: [ j:{...} , s:<id> ]. Anything else is ignored (and not logged: it may carry env).
        if frame.len() != 2 {
            debug!(
                message = "PM2 frame with unexpected arity ignored.",
                args = frame.len()
            );
            return;
        }
        let (Some(id), Some(body)) = (frame.pop(), frame.pop()) else {
            return;
        };
        let (Some(id), Some(_)) = (id.as_str(), body.as_json()) else {
            debug!(message = "PM2 frame with unexpected argument types ignored.");
            return;
        };
        let waiter = lock(&self.pending).waiters.remove(id);
        match waiter {
            // try_send: the channel holds one reply and the waiter is gone or waiting; never block.
            Some(tx) => {
                let _ = tx.try_send(body.0);
            }
            None => debug!(message = "Late PM2 reply dropped.", id),
        }
    }
}

fn decode_reply<R: DeserializeOwned>(
    method: &'static str,
    body: &[u8],
) -> Result<Option<R>, Pm2Error> {
    let json = body.strip_prefix(b"j:").unwrap_or(body);
    let reply: Reply<R> = serde_json::from_slice(json).map_err(|e| Pm2Error::Protocol {
        detail: format!("cannot decode the {method} reply: {e}"),
    })?;
    if let Some(error) = reply.error {
        return Err(Pm2Error::Remote {
            method,
            message: error.0,
        });
    }
    Ok(reply.args.and_then(|a| a.0))
}

#[cfg(test)]
mod tests {
    //! Against an in-process fake daemon: the real one must never see a hand-made frame.
    use super::*;
    use crate::pm2::codec::{encode_frame, Arg, RawArg};
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    const T: Duration = Duration::from_secs(2);

    fn read_request(
        stream: &mut UnixStream,
        dec: &mut Decoder,
    ) -> Option<(serde_json::Value, String)> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = dec.next_frame().unwrap() {
                let call: serde_json::Value =
                    serde_json::from_slice(f[0].as_json().unwrap()).unwrap();
                assert_eq!(call["args"].as_array().unwrap().len(), 1, "exactly one arg");
                return Some((call, f[1].as_str().unwrap().to_owned()));
            }
            let n = stream.read(&mut buf).ok()?;
            if n == 0 {
                return None;
            }
            dec.feed(&buf[..n]);
        }
    }

    fn reply(stream: &mut UnixStream, id: &str, json: &str) {
        stream
            .write_all(&encode_frame(&[Arg::Json(json.as_bytes()), Arg::Str(id)]))
            .unwrap();
    }

    fn fake() -> (tempfile::TempDir, Pm2Paths, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let paths = Pm2Paths::from_home(dir.path());
        let listener = UnixListener::bind(&paths.rpc).unwrap();
        (dir, paths, listener)
    }

    #[test]
    fn out_of_order_replies_are_matched_by_id() {
        let (_dir, paths, listener) = fake();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut dec = Decoder::new();
            let a = read_request(&mut s, &mut dec).unwrap();
            let b = read_request(&mut s, &mut dec).unwrap();
            // Answer the second first, both in one write.
            let mut both = Vec::new();
            for (call, id) in [&b, &a] {
                let answer = if call["method"] == "getVersion" {
                    r#"{"args":["7.0.4"]}"#
                } else {
                    r#"{"args":[{"msg":"pong"}]}"#
                };
                both.extend(encode_frame(&[Arg::Json(answer.as_bytes()), Arg::Str(id)]));
            }
            s.write_all(&both).unwrap();
            s
        });
        let client = Arc::new(Client::new(paths));
        let c2 = client.clone();
        let v = std::thread::spawn(move || c2.version(T));
        // Make sure the version request goes first.
        let start = Instant::now();
        while lock(&client.slot)
            .conn
            .as_ref()
            .is_none_or(|c| lock(&c.pending).waiters.is_empty())
        {
            assert!(start.elapsed() < T);
            std::thread::yield_now();
        }
        client.ping(T).unwrap();
        assert_eq!(v.join().unwrap().unwrap(), "7.0.4");
        assert_eq!(client.generation(), 1);
        drop(server.join().unwrap());
    }

    #[test]
    fn silent_daemon_times_out_within_the_deadline() {
        let (_dir, paths, listener) = fake();
        let _server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_secs(3));
            drop(s);
        });
        let client = Client::new(paths);
        let start = Instant::now();
        let err = client.ping(Duration::from_millis(300)).unwrap_err();
        let took = start.elapsed();
        assert!(
            matches!(err, Pm2Error::Timeout { method: "ping", .. }),
            "{err:?}"
        );
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(800),
            "{took:?}"
        );
    }

    #[test]
    fn a_partial_frame_then_silence_never_wedges_later_calls() {
        // A daemon that stalls half-way through a reply: the first call times out, and the next
        // call must not be read through the stale half frame: it gets a new connection.
        let (_dir, paths, listener) = fake();
        let server = std::thread::spawn(move || {
            let (mut first, _) = listener.accept().unwrap();
            let mut dec = Decoder::new();
            let (_, id) = read_request(&mut first, &mut dec).unwrap();
            let frame = encode_frame(&[Arg::Json(br#"{"args":[{"msg":"pong"}]}"#), Arg::Str(&id)]);
            first.write_all(&frame[..frame.len() / 2]).unwrap();
            // The second call arrives on a fresh connection.
            let (mut second, _) = listener.accept().unwrap();
            let mut dec = Decoder::new();
            let (call, id) = read_request(&mut second, &mut dec).unwrap();
            assert_eq!(call["method"], "getVersion");
            reply(&mut second, &id, r#"{"args":["7.0.4"]}"#);
            (first, second)
        });
        let client = Client::new(paths);
        let err = client.ping(Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, Pm2Error::Timeout { .. }), "{err:?}");
        assert_eq!(client.version(T).unwrap(), "7.0.4");
        assert_eq!(client.generation(), 2, "a new connection after the timeout");
        drop(server.join().unwrap());
    }

    #[test]
    fn socket_closed_mid_call_is_disconnected() {
        let (_dir, paths, listener) = fake();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut dec = Decoder::new();
            read_request(&mut s, &mut dec).unwrap();
            drop(s);
            listener
        });
        let client = Client::new(paths);
        let start = Instant::now();
        let err = client.list(Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(
                err,
                Pm2Error::Disconnected {
                    method: "getMonitorData"
                }
            ),
            "{err:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(1));
        // The next call reconnects; a pm_id call with the old generation is refused unsent.
        let listener = server.join().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut dec = Decoder::new();
            let (call, id) = read_request(&mut s, &mut dec).unwrap();
            assert_eq!(call["method"], "ping");
            reply(&mut s, &id, r#"{"args":[{"msg":"pong"}]}"#);
            // Nothing else arrives: the restart below must not be sent.
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            assert!(read_request(&mut s, &mut dec).is_none());
        });
        client.ping(T).unwrap();
        assert_eq!(client.generation(), 2);
        assert!(matches!(
            client.restart(0, 1, T),
            Err(Pm2Error::Reconnected { .. })
        ));
        server.join().unwrap();
    }

    #[test]
    fn missing_socket_is_daemon_down_and_backs_off() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(Pm2Paths::from_home(dir.path()));
        let err = client.ping(T).unwrap_err();
        assert!(matches!(err, Pm2Error::DaemonDown { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("PM2 daemon is down (no answer on "),
            "{err}"
        );
        // Within the backoff window the socket appearing is not noticed yet.
        let _l = UnixListener::bind(dir.path().join("rpc.sock")).unwrap();
        assert!(matches!(client.ping(T), Err(Pm2Error::DaemonDown { .. })));
        assert_eq!(client.generation(), 0);
        // And no daemon got spawned: only our socket is there.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("rpc.sock")]);
    }

    #[test]
    fn remote_error_and_list_decoding() {
        let (_dir, paths, listener) = fake();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut dec = Decoder::new();
            let (call, id) = read_request(&mut s, &mut dec).unwrap();
            assert_eq!(call["args"][0], serde_json::json!({"id": 7, "env": {}}));
            reply(
                &mut s,
                &id,
                r#"{"error":"Process 7 not found","stack":"..."}"#,
            );
            let (call, id) = read_request(&mut s, &mut dec).unwrap();
            assert_eq!(call["method"], "getMonitorData");
            reply(
                &mut s,
                &id,
                r#"{"args":[[{"pid":42,"name":"web","pm_id":0,"monit":{"memory":1,"cpu":0},
                "pm2_env":{"status":"online","env":{"TOKEN":"hunter2"},"TOKEN":"hunter2"}}]]}"#,
            );
        });
        let client = Client::new(paths);
        // A fresh client's first connection is generation 1.
        let err = client.restart(7, 1, T).unwrap_err();
        match &err {
            Pm2Error::Remote {
                method: "restartProcessId",
                message,
            } => assert_eq!(message, "Process 7 not found"),
            other => panic!("{other:?}"),
        }
        let snap = client.list(T).unwrap();
        assert_eq!(snap.generation, 1);
        assert_eq!(snap.processes().len(), 1);
        assert_eq!(snap.by_name("web")[0].pid, 42);
        assert!(!format!("{snap:?}").contains("hunter2"));
        server.join().unwrap();
    }

    #[test]
    fn raw_arg_helpers() {
        assert_eq!(RawArg(b"s:x".to_vec()).as_str(), Some("x"));
        assert!(RawArg(b"j:{}".to_vec()).as_str().is_none());
    }
}
