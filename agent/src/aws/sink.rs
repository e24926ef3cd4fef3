//! The AWS sink thread: a plain std thread that, every `flush_interval`, takes what the workers
//! recorded, encodes it, buffers it and delivers it with one PutMetricData, one PutLogEvents and
//! the due SNS alerts (more requests only at AWS's limits or to catch up), through the small
//! signed client in `client`.
//!
//! Contract with the rest of the agent:
//! - `Sink::start` never fails the agent: a sink that cannot start logs why and the agent keeps
//!   watching; nothing here ever blocks a worker (they only touch the `Recorder`).
//! - Every call has a connect timeout (1 s), an attempt timeout (6 s), an operation timeout below
//!   the flush interval, and retries with exponential backoff and full jitter (see `client`).
//! - While AWS is unreachable the buffer keeps everything (bounded; the oldest dropped and
//!   counted beyond it) and is spilled to `<state_dir>/spool/`; once AWS answers again it is
//!   delivered in order; an item leaves the buffer only after AWS accepted it. A request whose
//!   answer is lost may be repeated (at-least-once on the wire; no loss).
//! - A flush's calls are bounded: a request AWS refuses as a whole is searched for the items it
//!   refuses within a budget of extra calls (`bisect`), an item refused alone is dropped and
//!   counted, the unjudged rest waits for the next flush; a vanished log stream is created again
//!   once per flush.
//! - Every time AWS judges (timestamps, their 14-day / 2-hour window) is on AWS's clock
//!   (`Aws::aws_time`), learnt from its replies.
//! - `Sink::stop` flushes within a deadline, then spills what is left for the next start.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::alerts::{self, Alert, Limiter};
use super::bisect::{self, Bisect, Verdict};
use super::client::{xml_text, Aws, CallError, Service};
use super::creds::CredsError;
use super::imds::Imds;
use super::logs::{self, LogRecord};
use super::metrics::{self, Datum, Unit};
use super::recorder::{Recorder, Taken};
use super::spool::{Buffer, Capacity, Spool};
use crate::clock;
use crate::config::AwsConfig;
use crate::sync::Signal;

/// Tunables that are not in the config file (tests shorten them).
#[derive(Debug, Clone)]
pub struct SinkOptions {
    pub capacity: Capacity,
    pub alert_window_ms: u64,
    /// How long a stop may spend delivering before it spills the rest.
    pub stop_deadline: Duration,
}

impl Default for SinkOptions {
    fn default() -> SinkOptions {
        SinkOptions {
            capacity: Capacity::default(),
            alert_window_ms: super::alerts::DEFAULT_WINDOW_MS,
            stop_deadline: Duration::from_secs(5),
        }
    }
}

/// API requests the sink made, by kind (for the benchmark and the final log line).
#[derive(Debug, Default)]
pub struct Calls {
    pub put_metric_data: AtomicU64,
    pub put_log_events: AtomicU64,
    pub publish: AtomicU64,
    pub other: AtomicU64,
}

impl Calls {
    pub fn total(&self) -> u64 {
        self.put_metric_data.load(Ordering::Relaxed)
            + self.put_log_events.load(Ordering::Relaxed)
            + self.publish.load(Ordering::Relaxed)
            + self.other.load(Ordering::Relaxed)
    }
}

/// The running sink.
#[derive(Debug)]
pub struct Sink {
    join: JoinHandle<()>,
    stop: Arc<AtomicBool>,
    /// The stop deadline (`clock::mono_now` ms, 0 = none), read by every AWS call and attempt.
    stop_at: Arc<AtomicU64>,
    wake: Arc<Signal>,
    deadline: Duration,
    pub calls: Arc<Calls>,
}

impl Sink {
    /// Starts the sink thread. Fails only if the thread cannot be created.
    pub fn start(
        cfg: AwsConfig,
        state_dir: &Path,
        recorder: Arc<Recorder>,
        opts: SinkOptions,
    ) -> std::io::Result<Sink> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_at = Arc::new(AtomicU64::new(0));
        let wake = recorder.urgent();
        let calls = Arc::new(Calls::default());
        let spool = Spool::new(state_dir);
        let halt = Halt {
            stop: stop.clone(),
            at: stop_at.clone(),
        };
        let c = calls.clone();
        let deadline = opts.stop_deadline;
        let join = std::thread::Builder::new()
            .name("aws-sink".into())
            .spawn(move || run(cfg, spool, recorder, opts, halt, c))?;
        Ok(Sink {
            join,
            stop,
            stop_at,
            wake,
            deadline,
            calls,
        })
    }

    /// Flushes (within the stop deadline), spills what is left, and waits for the thread.
    /// The call in flight is shortened to the deadline too (an attempt already on the wire
    /// ends within its own 6 s bound).
    pub fn stop(self) {
        let deadline = clock::mono_now() + self.deadline.as_millis() as u64;
        self.stop_at.store(deadline.max(1), Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify();
        let until = deadline + 2_000;
        while !self.join.is_finished() && clock::mono_now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.join.is_finished() {
            let _ = self.join.join();
        } else {
            tracing::warn!(message = "The AWS sink did not stop in time; leaving it.");
        }
    }
}

/// The time a whole call (retries included) may take: below the flush interval, at least
/// 800 ms, at most 20 s.
pub fn op_timeout(flush: Duration) -> Duration {
    (flush * 3 / 4).clamp(Duration::from_millis(800), Duration::from_secs(20))
}

/// `arn:<partition>:sns:<region>:<account>:<topic>`, the partition taken from the caller's ARN.
pub fn topic_arn(
    caller_arn: Option<&str>,
    account: Option<&str>,
    region: &str,
    topic: &str,
) -> Option<String> {
    let account = account.filter(|a| !a.is_empty())?;
    let partition = caller_arn
        .and_then(|a| a.split(':').nth(1))
        .filter(|p| !p.is_empty())
        .unwrap_or("aws");
    Some(format!("arn:{partition}:sns:{region}:{account}:{topic}"))
}

/// How the stopping thread tells the sink: the flag, and the deadline its calls end by.
struct Halt {
    stop: Arc<AtomicBool>,
    at: Arc<AtomicU64>,
}

struct State {
    /// Set once the stop flush runs: catch-up requests in `serve` end at a stop, its own don't.
    finishing: bool,
    stop: Arc<AtomicBool>,
    cfg: AwsConfig,
    opts: SinkOptions,
    instance: String,
    buf: Buffer,
    spool: Spool,
    spooled: bool,
    limiter: Limiter,
    topic_arn: Option<String>,
    stream_ready: bool,
    /// Datums and events at the front of the buffer that the last flush held unjudged after
    /// AWS refused them (see `bisect`): the next flush never sends them with newer ones.
    held: [usize; 2],
    failing: [bool; 3],
    /// A credentials problem was logged (once: it names the fix).
    creds_reported: bool,
    calls: Arc<Calls>,
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn run(
    cfg: AwsConfig,
    spool: Spool,
    recorder: Arc<Recorder>,
    opts: SinkOptions,
    halt: Halt,
    calls: Arc<Calls>,
) {
    let mut imds = Imds::from_env(&process_env);
    let instance = match &cfg.instance_id {
        Some(i) => i.clone(),
        None => instance_id(imds.as_mut()),
    };
    if let Some(written) = &cfg.instance_id_written {
        tracing::warn!(message = "CloudWatch refuses the configured instance_id as a dimension value; sending it percent-encoded.", instance_id = %written, instance = %instance);
    }
    let op = op_timeout(cfg.flush_interval);
    let mut aws = Aws::new(cfg.region.as_deref(), Box::new(process_env), imds, op);
    aws.share_deadline(halt.at.clone());
    let mut st = State {
        finishing: false,
        stop: halt.stop.clone(),
        limiter: Limiter::new(opts.alert_window_ms, 1),
        instance,
        buf: Buffer::default(),
        spooled: false,
        spool,
        topic_arn: None,
        stream_ready: false,
        held: [0; 2],
        failing: [false; 3],
        creds_reported: false,
        calls,
        cfg,
        opts,
    };
    st.load_spool();
    if !aws.region_found {
        tracing::error!(
            message = "No AWS region; nothing can be sent until one is set.",
            error = super::client::NO_REGION
        );
    }
    tracing::info!(message = "AWS sink started.", region = ?aws.region, endpoint = %aws.endpoint_shown(Service::CloudWatch), namespace = %st.cfg.namespace, log_group = %st.cfg.log_group, instance = %st.instance);
    // A bug that panics here must not end delivery: the sink starts over with its buffer.
    while let Err(p) = catch_unwind(AssertUnwindSafe(|| st.serve(&mut aws, &recorder))) {
        st.recover(p.as_ref());
    }
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| st.finish(&mut aws, &recorder))) {
        st.recover(p.as_ref());
    }
}

/// What a panic said (a `&str` or `String` payload), for the log.
fn panic_text(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

impl State {
    /// What an earlier run could not deliver goes first.
    fn load_spool(&mut self) {
        match self.spool.load() {
            Ok(Some(old)) => {
                tracing::info!(
                    message = "Loaded undelivered AWS data from the spool; sending it first.",
                    path = %self.spool.path().display(),
                    datums = old.metrics.len(),
                    events = old.logs.len(),
                    alerts = old.alerts.len()
                );
                self.spooled = true;
                let cap = self.opts.capacity;
                self.buf.prepend(old, &cap);
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(message = "Cannot read the AWS spool.", path = %self.spool.path().display(), %error)
            }
        }
    }

    /// After a panic: logged, and the buffer spilled before the sink starts over with it.
    fn recover(&mut self, p: &(dyn std::any::Any + Send)) {
        tracing::error!(
            message = "The AWS sink failed (a bug); starting it again with its buffer.",
            error = panic_text(p),
            pending = self.buf.len()
        );
        self.persist();
    }

    /// At stop: the last data (including `agent_stop`), delivered within the deadline, then
    /// spilled.
    fn finish(&mut self, aws: &mut Aws, recorder: &Recorder) {
        self.finishing = true;
        self.intake(recorder.take());
        self.persist();
        self.deliver(aws, true);
        if !self.buf.is_empty() {
            tracing::warn!(
                message = "AWS flush at stop did not finish; spilling the rest.",
                pending = self.buf.len()
            );
        }
        self.persist();
        tracing::info!(
            message = "AWS sink stopped.",
            pending = self.buf.len(),
            dropped = self.buf.dropped_total,
            calls = self.calls.total()
        );
    }

    /// Whether a stop came while `serve` delivers: the stop flush then takes over.
    fn interrupted(&self) -> bool {
        !self.finishing && self.stop.load(Ordering::SeqCst)
    }

    /// Until stopped: every `flush_interval` everything recorded, and at once the events when
    /// an alert is waiting. What was taken is spilled before delivery starts, so a stop or a
    /// kill during a slow call loses none of it.
    fn serve(&mut self, aws: &mut Aws, recorder: &Recorder) {
        let wake = recorder.urgent();
        let flush_ms = self.cfg.flush_interval.as_millis() as u64;
        let mut next = clock::mono_now() + flush_ms;
        loop {
            let wait = Duration::from_millis(next.saturating_sub(clock::mono_now()));
            let woken = wake.wait(wait);
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if woken {
                self.intake(recorder.take_events());
                self.persist();
                self.deliver(aws, false);
                self.persist();
                continue;
            }
            next = (next + flush_ms).max(clock::mono_now() + flush_ms / 2);
            self.intake(recorder.take());
            self.persist();
            self.deliver(aws, true);
            self.persist();
        }
    }
}

/// Removes the items AWS would refuse for their time (see `logs::acceptable`, on AWS's clock),
/// keeping `held` (the unjudged items at the front, see `bisect`) in step. Returns how many.
fn drop_untimely<T>(
    items: &mut VecDeque<T>,
    held: &mut usize,
    aws: &Aws,
    ts_ms: impl Fn(&T) -> u64,
) -> usize {
    let now = aws.aws_time(clock::wall_ms());
    let before = items.len();
    let front = (*held).min(before);
    let (mut i, mut kept_front) = (0, front);
    items.retain(|item| {
        let keep = logs::acceptable(aws.aws_time(ts_ms(item)), now);
        kept_front -= usize::from(!keep && i < *held);
        i += 1;
        keep
    });
    *held = kept_front;
    before - items.len()
}

/// The InstanceId dimension: IMDSv2 on EC2 (unless AWS_EC2_METADATA_DISABLED), else the host
/// name, as AWS accepts it (`names::instance_name`: percent-encoded where it would refuse it).
pub fn instance_id(imds: Option<&mut Imds>) -> String {
    let id = imds.and_then(|i| i.instance_id()).unwrap_or_else(hostname);
    super::names::instance_name(&id).into_owned()
}

/// The InstanceId this box gets from the environment (the CLI's view of what the agent will use).
/// Blocks for up to a few seconds when IMDS is on and nothing answers.
pub fn this_instance() -> String {
    instance_id(Imds::from_env(&process_env).as_mut())
}

use crate::sys::hostname;

const METRICS: usize = 0;
const LOGS: usize = 1;
const ALERTS: usize = 2;
const SERVICE: [&str; 3] = ["CloudWatch", "CloudWatch Logs", "SNS"];

impl State {
    /// Turns what the workers recorded into buffered items.
    fn intake(&mut self, t: Taken) {
        let now = clock::wall_ms();
        self.buf.count_dropped(t.dropped);
        let mut datums = Vec::new();
        let mut alerts: Vec<Alert> = Vec::new();
        let mut records: Vec<LogRecord> = Vec::with_capacity(t.events.len());
        for e in &t.events {
            if let Some(r) = LogRecord::from_event(e) {
                records.push(r);
            }
            if logs::is_alert(e.kind) && self.cfg.sns_topic.is_some() {
                if let Some(a) =
                    alerts::alert_for(&mut self.limiter, e, &self.instance, clock::mono_now())
                {
                    alerts.push(a);
                }
            }
        }
        logs::chronological(&mut records);
        if t.heartbeat {
            let dropped = std::mem::take(&mut self.buf.dropped);
            datums = metrics::encode(
                &t.apps,
                &self.instance,
                self.cfg.fleet.as_deref(),
                now,
                dropped,
                t.alive,
            );
            let before = datums.len();
            datums.retain(|d| match d.invalid() {
                None => true,
                Some(why) => {
                    tracing::error!(message = "Dropping a metric AWS would refuse.", metric = %d.name, reason = why);
                    false
                }
            });
            self.buf.count_dropped((before - datums.len()) as u64);
        }
        let cap = self.opts.capacity;
        // An overflow drops the oldest: the held items among them are no longer held.
        let metrics_len = self.buf.metrics.len() + datums.len();
        let logs_len = self.buf.logs.len() + records.len();
        let dropped = self.buf.push(&cap, datums, records, alerts);
        self.held[METRICS] =
            self.held[METRICS].saturating_sub(metrics_len - self.buf.metrics.len());
        self.held[LOGS] = self.held[LOGS].saturating_sub(logs_len - self.buf.logs.len());
        if dropped > 0 {
            tracing::warn!(
                message =
                    "AWS buffer full; dropped the oldest items (reported as DroppedDatapoints).",
                dropped,
                total = self.buf.dropped_total
            );
        }
    }

    /// A failed call: credentials problems are logged once as errors (a person must act);
    /// the rest once per outage.
    fn fail(&mut self, which: usize, e: &CallError) {
        if let CallError::Credentials(error) = e {
            if matches!(error, CredsError::Fetch { .. }) {
                // The metadata endpoint did not answer: an outage like any other.
                self.note_failure(which, &e.to_string());
                return;
            }
            if !self.creds_reported {
                self.creds_reported = true;
                tracing::error!(message = "No usable AWS credentials; keeping data to send later.", %error);
            }
            self.failing[which] = true;
            return;
        }
        self.note_failure(which, &e.to_string());
    }

    fn note_failure(&mut self, which: usize, error: &str) {
        if !self.failing[which] {
            self.failing[which] = true;
            tracing::warn!(message = "AWS unreachable or refusing; keeping data to send later.", service = SERVICE[which], pending = self.buf.len(), %error);
        }
    }

    fn note_success(&mut self, which: usize) {
        // Credentials work again: a later problem with them is logged again.
        self.creds_reported = false;
        if self.failing[which] {
            self.failing[which] = false;
            tracing::info!(
                message = "AWS reachable again; sending buffered data.",
                service = SERVICE[which]
            );
        }
    }

    /// Sends the buffer, oldest first, until it is empty or a service fails.
    fn deliver(&mut self, aws: &mut Aws, with_metrics: bool) {
        if with_metrics {
            self.send_metrics(aws);
        }
        if !self.interrupted() {
            self.send_logs(aws);
        }
        if !self.interrupted() {
            self.send_alerts(aws);
        }
    }

    /// Drops buffered datums CloudWatch would refuse for their time (older than 14 days or more
    /// than 2 hours ahead of AWS's clock, their timestamps moved to it as they will be sent).
    fn drop_stale_metrics(&mut self, aws: &Aws) {
        let stale = drop_untimely(&mut self.buf.metrics, &mut self.held[METRICS], aws, |d| {
            d.ts_ms
        });
        if stale > 0 {
            self.buf.count_dropped(stale as u64);
            tracing::warn!(
                message = "Dropped metrics CloudWatch would refuse (older than 14 days or too far ahead).",
                dropped = stale
            );
        }
    }

    /// How many datums from `start` make the next PutMetricData: within AWS's limits, and the
    /// form-encoded body checked against the 1 MB too (a request over it is split, never gzipped).
    fn metric_request_len(&self, start: usize, resolution: u32) -> usize {
        let mut n = metrics::next_request_len(self.buf.metrics.range(start..));
        while n > 1 {
            let batch = self.buf.metrics.range(start..start + n);
            let params = metric_params(&self.cfg.namespace, batch, resolution, 0);
            if super::client::query_body("PutMetricData", CW_VERSION, &params).len()
                <= metrics::MAX_REQUEST_BYTES
            {
                break;
            }
            n /= 2;
        }
        n
    }

    /// Every buffered datum, oldest first, in as few requests as AWS's limits allow. A request
    /// AWS refuses as a whole is searched for the datums it refuses within a budget of extra
    /// calls (see `bisect`): a datum refused alone is dropped and counted, the others go, and
    /// what the budget left unjudged stays buffered (and spooled) for the next flush.
    fn send_metrics(&mut self, aws: &mut Aws) {
        let resolution = if self.cfg.high_resolution { 1 } else { 60 };
        self.drop_stale_metrics(aws);
        let largest = metrics::next_request_len(self.buf.metrics.iter());
        let suspects = self.held[METRICS].min(self.buf.metrics.len());
        let mut search = Bisect::new(bisect::budget_for(largest), suspects);
        while !self.interrupted() {
            let Some(n) = search.next(|start| self.metric_request_len(start, resolution)) else {
                break;
            };
            let at = search.held();
            let batch: Vec<Datum> = self.buf.metrics.range(at..at + n).cloned().collect();
            let namespace = self.cfg.namespace.clone();
            let body = |skew| {
                let params = metric_params(&namespace, batch.iter(), resolution, skew);
                super::client::query_body("PutMetricData", CW_VERSION, &params).into_bytes()
            };
            self.calls.put_metric_data.fetch_add(1, Ordering::Relaxed);
            match aws.query_at(Service::CloudWatch, &body) {
                Ok(_) => {
                    self.buf.metrics.drain(at..at + n);
                    search.accepted();
                    self.note_success(METRICS);
                }
                Err(e) if e.is_refused() => match search.refused() {
                    Verdict::Bad => {
                        let metric = &self.buf.metrics[at].name;
                        tracing::error!(message = "CloudWatch refused a metric; dropping it.", %metric, error = %e);
                        self.buf.metrics.remove(at);
                        self.buf.count_dropped(1);
                    }
                    Verdict::Split | Verdict::Held => {}
                },
                Err(e) => {
                    self.fail(METRICS, &e);
                    break;
                }
            }
        }
        self.note_held(METRICS, search.held());
    }

    fn ensure_stream(&mut self, aws: &mut Aws) -> Result<(), CallError> {
        let group = self.cfg.log_group.clone();
        if self.cfg.fleet.is_some() {
            // The fleet's group is provision-aws's: an instance only creates its own stream.
            return self.create_stream(aws);
        }
        self.calls.other.fetch_add(1, Ordering::Relaxed);
        match aws.logs(
            "CreateLogGroup",
            &serde_json::json!({ "logGroupName": group }),
        ) {
            Ok(_) => {
                self.calls.other.fetch_add(1, Ordering::Relaxed);
                let days = self.cfg.log_retention_days;
                let body = serde_json::json!({ "logGroupName": group, "retentionInDays": days });
                if let Err(error) = aws.logs("PutRetentionPolicy", &body) {
                    tracing::warn!(message = "Cannot set the log group's retention.", path = %group, %error);
                }
                tracing::info!(message = "Created the CloudWatch Logs group.", path = %group, retention_days = days);
            }
            Err(e) if e.code() == Some("ResourceAlreadyExistsException") => {}
            Err(e) => return Err(e),
        }
        self.create_stream(aws)
    }

    /// This instance's stream in the group (already there is fine).
    fn create_stream(&mut self, aws: &mut Aws) -> Result<(), CallError> {
        self.calls.other.fetch_add(1, Ordering::Relaxed);
        let body = serde_json::json!({ "logGroupName": self.cfg.log_group, "logStreamName": super::names::stream_name(&self.instance) });
        match aws.logs("CreateLogStream", &body) {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("ResourceAlreadyExistsException") => Ok(()),
            Err(CallError::Service { status, code, .. })
                if self.cfg.fleet.is_some() && code == "ResourceNotFoundException" =>
            {
                Err(CallError::Service {
                    status,
                    code,
                    message: format!(
                        "CreateLogStream: the fleet's log group {} does not exist; run `pmguard provision-aws` with the fleet's config (admin credentials) to create it",
                        self.cfg.log_group
                    ),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Drops buffered events CloudWatch Logs would refuse (older than 14 days or more than 2
    /// hours ahead of AWS's clock, their timestamps moved to it as they will be sent).
    fn drop_unacceptable_logs(&mut self, aws: &Aws) {
        let stale = drop_untimely(&mut self.buf.logs, &mut self.held[LOGS], aws, |r| r.ts_ms);
        if stale > 0 {
            self.buf.count_dropped(stale as u64);
            tracing::warn!(message = "Dropped events CloudWatch Logs would refuse (older than 14 days or too far ahead).", dropped = stale);
        }
    }

    /// The PutLogEvents body for `batch`, in the order it requires, its timestamps on AWS's
    /// clock (`skew_ms` ahead of ours). The 24-hour span of a batch is the same on either clock.
    fn log_batch(&self, batch: &[LogRecord], skew_ms: i64) -> serde_json::Value {
        let mut batch = batch.to_vec();
        logs::chronological(&mut batch);
        let events: Vec<serde_json::Value> = batch
            .into_iter()
            .map(|r| serde_json::json!({ "timestamp": r.ts_ms.saturating_add_signed(skew_ms), "message": r.message }))
            .collect();
        serde_json::json!({
            "logGroupName": self.cfg.log_group,
            "logStreamName": super::names::stream_name(&self.instance),
            "logEvents": events,
        })
    }

    /// The items at the front of the buffer this flush held unjudged (see `bisect`).
    fn note_held(&mut self, which: usize, held: usize) {
        self.held[which] = held;
        if held > 0 {
            tracing::warn!(
                message =
                    "AWS refused requests; keeping what is not yet judged for the next flush.",
                service = SERVICE[which],
                pending = held
            );
        }
    }

    /// Events of an accepted batch of `n` that CloudWatch Logs rejected (too old, expired, too
    /// new): AWS dropped them, so they are counted as dropped.
    fn count_rejected(&mut self, reply: &serde_json::Value, n: usize) {
        let Some(info) = reply.get("rejectedLogEventsInfo") else {
            return;
        };
        let rejected = logs::rejected(info, n);
        if rejected > 0 {
            self.buf.count_dropped(rejected as u64);
            tracing::warn!(message = "CloudWatch Logs rejected some events (counted as dropped).", dropped = rejected, too_old = ?info.get("tooOldLogEventEndIndex"), expired = ?info.get("expiredLogEventEndIndex"), too_new = ?info.get("tooNewLogEventStartIndex"));
        }
    }

    /// Every buffered event, oldest first, as `send_metrics` sends datums (a refused batch is
    /// searched within a budget; an event refused alone is dropped and counted). A deleted group
    /// or stream is created again once per flush: one that keeps vanishing is an outage, not a
    /// reason to loop.
    fn send_logs(&mut self, aws: &mut Aws) {
        self.drop_unacceptable_logs(aws);
        let largest = logs::next_batch_len(self.buf.logs.iter());
        let suspects = self.held[LOGS].min(self.buf.logs.len());
        let mut search = Bisect::new(bisect::budget_for(largest), suspects);
        let mut recreated = false;
        while !self.buf.logs.is_empty() && !self.interrupted() {
            if !self.stream_ready {
                if let Err(e) = self.ensure_stream(aws) {
                    self.fail(LOGS, &e);
                    break;
                }
                self.stream_ready = true;
            }
            let Some(n) = search.next(|start| logs::next_batch_len(self.buf.logs.range(start..)))
            else {
                break;
            };
            let at = search.held();
            let batch: Vec<LogRecord> = self.buf.logs.range(at..at + n).cloned().collect();
            self.calls.put_log_events.fetch_add(1, Ordering::Relaxed);
            match aws.logs_at("PutLogEvents", &|skew| self.log_batch(&batch, skew)) {
                Ok(out) => {
                    self.buf.logs.drain(at..at + n);
                    search.accepted();
                    self.note_success(LOGS);
                    self.count_rejected(&out, n);
                }
                Err(e) if e.code() == Some("ResourceNotFoundException") && !recreated => {
                    // The group or stream was deleted under us: create it again and resend.
                    recreated = true;
                    search.again();
                    self.stream_ready = false;
                }
                Err(e) if e.is_refused() => match search.refused() {
                    Verdict::Bad => {
                        tracing::error!(message = "CloudWatch Logs refused an event; dropping it.", dropped = 1, error = %e);
                        self.buf.logs.remove(at);
                        self.buf.count_dropped(1);
                    }
                    Verdict::Split | Verdict::Held => {}
                },
                Err(e) => {
                    self.stream_ready &= e.code() != Some("ResourceNotFoundException");
                    self.fail(LOGS, &e);
                    break;
                }
            }
        }
        self.note_held(LOGS, search.held());
    }

    /// The topic's ARN, looked up once: a fleet's topic is provision-aws's (its ARN is built,
    /// never created); a single box's is created (CreateTopic returns the existing one).
    fn topic(&mut self, aws: &mut Aws, topic: &str) -> Result<String, CallError> {
        if let Some(arn) = &self.topic_arn {
            return Ok(arn.clone());
        }
        self.calls.other.fetch_add(1, Ordering::Relaxed);
        let missing = |what: &str| CallError::Transport(format!("{what} (unreadable reply)"));
        let arn = if self.cfg.fleet.is_some() {
            let xml = aws.query(Service::Sts, "GetCallerIdentity", "2011-06-15", &[])?;
            let (arn, account) = (xml_text(&xml, "Arn"), xml_text(&xml, "Account"));
            topic_arn(arn.as_deref(), account.as_deref(), &aws.region, topic)
                .ok_or_else(|| missing("GetCallerIdentity returned no account"))?
        } else {
            let params = [("Name".to_string(), topic.to_string())];
            let xml = aws.query(Service::Sns, "CreateTopic", SNS_VERSION, &params)?;
            xml_text(&xml, "TopicArn").ok_or_else(|| missing("CreateTopic returned no ARN"))?
        };
        self.topic_arn = Some(arn.clone());
        Ok(arn)
    }

    fn send_alerts(&mut self, aws: &mut Aws) {
        let Some(topic) = self.cfg.sns_topic.clone() else {
            return;
        };
        while let Some(a) = self.buf.alerts.front().cloned() {
            if self.interrupted() {
                return;
            }
            let arn = match self.topic(aws, &topic) {
                Ok(arn) => arn,
                Err(e) => {
                    self.fail(ALERTS, &e);
                    return;
                }
            };
            self.calls.publish.fetch_add(1, Ordering::Relaxed);
            let params = [
                ("TopicArn".to_string(), arn),
                ("Subject".to_string(), a.subject.clone()),
                ("Message".to_string(), a.message.clone()),
            ];
            match aws.query(Service::Sns, "Publish", SNS_VERSION, &params) {
                Ok(_) => {
                    self.buf.alerts.pop_front();
                    self.note_success(ALERTS);
                    tracing::info!(message = "Alert published.", app = %a.app, alarm = %a.subject);
                }
                Err(e) if e.is_refused() => {
                    tracing::error!(message = "SNS refused an alert; dropping it.", app = %a.app, error = %e);
                    self.buf.alerts.pop_front();
                    self.buf.count_dropped(1);
                }
                Err(e) => {
                    self.fail(ALERTS, &e);
                    return;
                }
            }
        }
    }

    /// Spills the buffer when it holds anything; removes the spool once it is empty.
    fn persist(&mut self) {
        if self.buf.is_empty() && self.buf.dropped == 0 && !self.spooled {
            return;
        }
        match self.spool.store(&self.buf) {
            Ok(()) => self.spooled = !(self.buf.is_empty() && self.buf.dropped == 0),
            Err(error) => {
                tracing::warn!(message = "Cannot write the AWS spool.", path = %self.spool.path().display(), %error)
            }
        }
    }
}

const CW_VERSION: &str = "2010-08-01";
const SNS_VERSION: &str = "2010-03-31";

/// PutMetricData's awsquery parameters for `datums` (StatisticValues, never raw values), their
/// timestamps moved `skew_ms` to AWS's clock.
pub fn metric_params<'a>(
    namespace: &str,
    datums: impl Iterator<Item = &'a Datum>,
    resolution: u32,
    skew_ms: i64,
) -> Vec<(String, String)> {
    let mut p = vec![("Namespace".to_string(), namespace.to_string())];
    for (i, d) in datums.enumerate() {
        let m = format!("MetricData.member.{}", i + 1);
        let unit = match d.unit {
            Unit::None => "None",
            Unit::Count => "Count",
            Unit::Milliseconds => "Milliseconds",
            Unit::Percent => "Percent",
            Unit::Bytes => "Bytes",
        };
        p.push((format!("{m}.MetricName"), d.name.clone()));
        for (j, (k, v)) in d.dims.iter().enumerate() {
            p.push((format!("{m}.Dimensions.member.{}.Name", j + 1), k.clone()));
            p.push((format!("{m}.Dimensions.member.{}.Value", j + 1), v.clone()));
        }
        p.push((
            format!("{m}.Timestamp"),
            clock::rfc3339(d.ts_ms.saturating_add_signed(skew_ms)),
        ));
        let s = &d.stats;
        p.push((
            format!("{m}.StatisticValues.SampleCount"),
            s.count.to_string(),
        ));
        p.push((format!("{m}.StatisticValues.Sum"), s.sum.to_string()));
        p.push((format!("{m}.StatisticValues.Minimum"), s.min.to_string()));
        p.push((format!("{m}.StatisticValues.Maximum"), s.max.to_string()));
        p.push((format!("{m}.Unit"), unit.to_string()));
        p.push((format!("{m}.StorageResolution"), resolution.to_string()));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::aws::test_env::{self, Answer, Seen};

    /// The sink's state for `endpoint` (static test keys), as `run` builds it, its spool in a
    /// temporary directory.
    fn sink_at(endpoint: &str) -> (State, Aws, tempfile::TempDir) {
        let text = "[aws]\nregion = \"us-east-1\"\nnamespace = \"PM2/Test\"\nlog_group = \"/g\"\ninstance_id = \"i-1\"\n[[apps]]\nname = \"a\"\n";
        let cfg = crate::config::Config::parse(Path::new("/t.toml"), text)
            .unwrap()
            .aws
            .unwrap();
        let env = test_env::static_keys(endpoint);
        let aws = Aws::new(
            Some("us-east-1"),
            Box::new(env),
            None,
            Duration::from_secs(3),
        );
        let dir = tempfile::tempdir().unwrap();
        let st = State {
            finishing: false,
            stop: Arc::new(AtomicBool::new(false)),
            limiter: Limiter::new(1, 1),
            instance: "i-1".into(),
            buf: Buffer::default(),
            spool: Spool::new(dir.path()),
            spooled: false,
            topic_arn: None,
            stream_ready: false,
            held: [0; 2],
            failing: [false; 3],
            creds_reported: false,
            calls: Arc::new(Calls::default()),
            cfg,
            opts: SinkOptions::default(),
        };
        (st, aws, dir)
    }

    fn datum(app: &str, ts_ms: u64) -> Datum {
        Datum {
            name: "ServiceStatus".into(),
            dims: vec![
                ("App".into(), app.into()),
                ("InstanceId".into(), "i-1".into()),
            ],
            ts_ms,
            stats: metrics::Stats::one(1.0),
            unit: Unit::None,
        }
    }

    fn record(message: &str, ts_ms: u64) -> LogRecord {
        LogRecord {
            ts_ms,
            message: message.into(),
        }
    }

    fn reply(status: &'static str, body: &str) -> Answer {
        (status, Vec::new(), body.to_string())
    }

    const INVALID: &str = "<ErrorResponse><Error><Code>InvalidParameterValue</Code><Message>bad dimension</Message></Error></ErrorResponse>";

    /// A CloudWatch that refuses every PutMetricData carrying the dimension value
    /// `refused-by-aws`, as AWS refuses a whole request for one datum that no local check
    /// catches (ministack accepts what AWS refuses, so it cannot stand in here); counts the
    /// datums it accepts.
    fn refusing_cloudwatch() -> (String, Arc<AtomicU64>) {
        let accepted = Arc::new(AtomicU64::new(0));
        let a = accepted.clone();
        let ep = test_env::server(move |r: &Seen| {
            if r.body.contains("refused-by-aws") {
                reply("400 Bad Request", INVALID)
            } else {
                let n = r.body.matches(".MetricName=").count() as u64;
                a.fetch_add(n, Ordering::SeqCst);
                reply("200 OK", "<PutMetricDataResponse/>")
            }
        });
        (ep, accepted)
    }

    #[test]
    fn a_refused_batch_is_halved_until_only_the_refused_datum_is_dropped() {
        let (ep, accepted) = refusing_cloudwatch();
        let (mut st, mut aws, _dir) = sink_at(&ep);
        let now = clock::wall_ms();
        let mut all: Vec<Datum> = (0..7).map(|i| datum(&format!("app{i}"), now)).collect();
        all.insert(3, datum("refused-by-aws", now));
        st.buf
            .push(&Capacity::default(), all, Vec::new(), Vec::new());
        st.send_metrics(&mut aws);
        assert!(st.buf.metrics.is_empty());
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            7,
            "the 7 good datums delivered"
        );
        assert_eq!(st.buf.dropped, 1, "only the refused one counted as dropped");
    }

    #[test]
    fn a_request_aws_refuses_costs_a_bounded_number_of_calls_per_flush_and_valid_datums_arrive() {
        let (ep, accepted) = refusing_cloudwatch();
        let (mut st, mut aws, dir) = sink_at(&ep);
        let now = clock::wall_ms();
        let mut all: Vec<Datum> = (0..1000).map(|_| datum("refused-by-aws", now)).collect();
        all.extend((0..200).map(|i| datum(&format!("app{i}"), now)));
        st.buf
            .push(&Capacity::default(), all, Vec::new(), Vec::new());
        let counter = st.calls.clone();
        let calls = || counter.put_metric_data.load(Ordering::Relaxed);
        // One request per 1000 datums, plus the budget of the search.
        let bound = 2 + u64::from(bisect::budget_for(1000));
        st.send_metrics(&mut aws);
        let first = calls();
        eprintln!(
            "first flush: {first} PutMetricData calls, {} datums proven bad",
            st.buf.dropped
        );
        assert!(first <= bound, "{first} calls in one flush");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            200,
            "the valid datums arrived"
        );
        let proven = st.buf.dropped;
        assert!(proven >= 1);
        assert_eq!(
            st.buf.metrics.len() as u64,
            1000 - proven,
            "the rest are kept"
        );
        assert!(st
            .buf
            .metrics
            .iter()
            .all(|d| d.dims[0].1 == "refused-by-aws"));
        // What was not judged is spooled for the next flush (and the next start).
        st.persist();
        let spooled = Spool::new(dir.path()).load().unwrap().unwrap();
        assert_eq!(spooled.metrics.len(), st.buf.metrics.len());
        // Each later flush is bounded too, and the datums recorded since go at once.
        for flush in 1..=3u64 {
            st.buf.push(
                &Capacity::default(),
                vec![datum("web", now)],
                Vec::new(),
                Vec::new(),
            );
            let before = calls();
            st.send_metrics(&mut aws);
            assert!(
                calls() - before <= bound,
                "flush {flush}: {} calls",
                calls() - before
            );
            assert_eq!(accepted.load(Ordering::SeqCst), 200 + flush);
        }
        assert!(st.buf.dropped > proven, "more proven bad at each flush");
        assert!(st
            .buf
            .metrics
            .iter()
            .all(|d| d.dims[0].1 == "refused-by-aws"));
    }

    #[test]
    fn refused_log_events_cost_a_bounded_number_of_calls_per_flush() {
        // A CloudWatch Logs that refuses any PutLogEvents holding an event it finds invalid.
        let accepted = Arc::new(AtomicU64::new(0));
        let a = accepted.clone();
        let ep = test_env::server(move |r: &Seen| match r.header("x-amz-target") {
            Some("Logs_20140328.PutLogEvents") if r.body.contains("refused-by-aws") => reply(
                "400 Bad Request",
                r#"{"__type":"InvalidParameterException","message":"bad event"}"#,
            ),
            Some("Logs_20140328.PutLogEvents") => {
                let n = r.body.matches("\"timestamp\"").count() as u64;
                a.fetch_add(n, Ordering::SeqCst);
                reply("200 OK", "{}")
            }
            _ => reply("200 OK", "{}"),
        });
        let (mut st, mut aws, _dir) = sink_at(&ep);
        let now = clock::wall_ms();
        let all: Vec<LogRecord> = (0..2000).map(|_| record("refused-by-aws", now)).collect();
        st.buf
            .push(&Capacity::default(), Vec::new(), all, Vec::new());
        let counter = st.calls.clone();
        let calls = || counter.put_log_events.load(Ordering::Relaxed);
        let bound = 1 + u64::from(bisect::budget_for(2000));
        st.send_logs(&mut aws);
        eprintln!(
            "first flush: {} PutLogEvents calls, {} events proven bad",
            calls(),
            st.buf.dropped
        );
        assert!(calls() <= bound, "{} calls", calls());
        assert!(st.buf.dropped >= 1);
        assert_eq!(
            st.buf.logs.len() as u64,
            2000 - st.buf.dropped,
            "the rest are kept"
        );
        // The events recorded since go in the next flush, which is bounded too.
        let new: Vec<LogRecord> = (0..50)
            .map(|i| record(&format!("event {i}"), now))
            .collect();
        st.buf
            .push(&Capacity::default(), Vec::new(), new, Vec::new());
        let before = calls();
        st.send_logs(&mut aws);
        assert!(calls() - before <= bound + 1, "{} calls", calls() - before);
        assert_eq!(accepted.load(Ordering::SeqCst), 50);
        assert!(st.buf.logs.iter().all(|r| r.message == "refused-by-aws"));
    }

    /// Epoch ms of a SigV4 `X-Amz-Date` (`20261130T124000Z`).
    fn amz_date_ms(d: &str) -> Option<u64> {
        let b = d.get(..15)?;
        clock::parse_rfc3339(&format!(
            "{}-{}-{}T{}:{}:{}Z",
            &b[0..4],
            &b[4..6],
            &b[6..8],
            &b[9..11],
            &b[11..13],
            &b[13..15]
        ))
    }

    /// The timestamps a fake AWS accepted: datums', events'.
    type Accepted = (Vec<u64>, Vec<u64>);

    /// AWS as it judges time, with a clock 3 hours behind ours (ministack judges none of it):
    /// every reply carries its `Date`; a signature more than 5 minutes off its time is refused
    /// (403, "Signature expired"); PutMetricData is refused (400 InvalidParameterValue) for a
    /// Timestamp more than 2 hours ahead or 14 days behind; PutLogEvents takes the request but
    /// rejects such events (`rejectedLogEventsInfo`). Keeps the timestamps it accepted.
    fn aws_three_hours_behind() -> (String, Arc<std::sync::Mutex<Accepted>>) {
        const AHEAD: u64 = 2 * 3_600_000;
        const BEHIND: u64 = 14 * 86_400_000;
        let theirs = || clock::wall_ms() - 3 * 3_600_000;
        let kept = Arc::new(std::sync::Mutex::new((Vec::new(), Vec::new())));
        let k = kept.clone();
        let ep = test_env::server(move |r: &Seen| {
            let now = theirs();
            let date = vec![("Date", test_env::http_date(now))];
            let signed = r.header("x-amz-date").and_then(amz_date_ms).unwrap_or(0);
            if signed.abs_diff(now) > 300_000 {
                return ("403 Forbidden", date, "<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code><Message>Signature expired: 20261130T150000Z is now earlier than 20261130T115500Z (20261130T121000Z - 15 min.)</Message></Error></ErrorResponse>".into());
            }
            let judged = |t: u64| t <= now + AHEAD && t + BEHIND >= now;
            match r.header("x-amz-target") {
                Some("Logs_20140328.PutLogEvents") => {
                    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                    let times: Vec<u64> = v["logEvents"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e["timestamp"].as_u64().unwrap())
                        .collect();
                    let too_new = times.iter().position(|t| *t > now + AHEAD);
                    let ok = times[..too_new.unwrap_or(times.len())].iter();
                    k.lock().unwrap().1.extend(ok.filter(|t| judged(**t)));
                    let body = match too_new {
                        Some(i) => {
                            serde_json::json!({ "rejectedLogEventsInfo": { "tooNewLogEventStartIndex": i } })
                        }
                        None => serde_json::json!({}),
                    };
                    ("200 OK", date, body.to_string())
                }
                Some(_) => ("200 OK", date, "{}".into()),
                None => {
                    let times: Vec<u64> = r
                        .body
                        .split('&')
                        .filter_map(|p| p.split_once(".Timestamp="))
                        .map(|(_, v)| clock::parse_rfc3339(&v.replace("%3A", ":")).unwrap())
                        .collect();
                    if times.iter().all(|t| judged(*t)) {
                        k.lock().unwrap().0.extend(times);
                        ("200 OK", date, "<PutMetricDataResponse/>".into())
                    } else {
                        ("400 Bad Request", date, "<ErrorResponse><Error><Code>InvalidParameterValue</Code><Message>The parameter MetricData.member.1.Timestamp must specify a time no more than two hours in the future.</Message></Error></ErrorResponse>".into())
                    }
                }
            }
        });
        (ep, kept)
    }

    #[test]
    fn a_clock_hours_off_sends_datum_and_event_times_on_aws_s_clock() {
        let (ep, kept) = aws_three_hours_behind();
        let (mut st, mut aws, _dir) = sink_at(&ep);
        let now = clock::wall_ms();
        let datums = (0..5).map(|i| datum(&format!("app{i}"), now)).collect();
        let events = (0..3).map(|i| record(&format!("event {i}"), now)).collect();
        st.buf
            .push(&Capacity::default(), datums, events, Vec::new());
        st.deliver(&mut aws, true);
        let (metric_times, event_times) = kept.lock().unwrap().clone();
        let aws_now = clock::wall_ms() - 3 * 3_600_000;
        assert_eq!(metric_times.len(), 5, "every datum accepted");
        assert_eq!(event_times.len(), 3, "every event accepted");
        for t in metric_times.iter().chain(&event_times) {
            assert!(
                t.abs_diff(aws_now) < 60_000,
                "stamped {} ms off AWS's clock",
                t.abs_diff(aws_now)
            );
        }
        assert_eq!(
            (st.buf.dropped, st.buf.len()),
            (0, 0),
            "nothing dropped or left"
        );
        assert!(
            (aws.skew_ms() + 3 * 3_600_000).abs() < 5_000,
            "{}",
            aws.skew_ms()
        );
    }

    /// A CloudWatch Logs whose PutLogEvents answers `put` (creating groups and streams works);
    /// counts the PutLogEvents calls. Ministack answers as AWS does, so cannot stand in.
    fn logs_answering(put: &'static str, status: &'static str) -> (String, Arc<AtomicU64>) {
        let puts = Arc::new(AtomicU64::new(0));
        let p = puts.clone();
        let ep = test_env::server(move |r: &Seen| match r.header("x-amz-target") {
            Some("Logs_20140328.PutLogEvents") => {
                p.fetch_add(1, Ordering::SeqCst);
                reply(status, put)
            }
            _ => reply("200 OK", "{}"),
        });
        (ep, puts)
    }

    #[test]
    fn a_log_stream_that_keeps_vanishing_is_created_again_once_per_flush_not_in_a_loop() {
        let (ep, puts) = logs_answering(
            r#"{"__type":"ResourceNotFoundException","message":"The specified log stream does not exist."}"#,
            "400 Bad Request",
        );
        let (mut st, mut aws, _dir) = sink_at(&ep);
        // Stops the sink after 50 calls: without a bound the flush never ends by itself.
        let (stop, p) = (st.stop.clone(), puts.clone());
        std::thread::spawn(move || {
            while p.load(Ordering::SeqCst) < 50 {
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::SeqCst);
        });
        let now = clock::wall_ms();
        st.buf.push(
            &Capacity::default(),
            Vec::new(),
            vec![record("restart", now)],
            Vec::new(),
        );
        st.send_logs(&mut aws);
        assert_eq!(
            puts.load(Ordering::SeqCst),
            2,
            "PutLogEvents calls in one flush"
        );
        assert_eq!(st.buf.logs.len(), 1, "the event is kept for the next flush");
        assert!(st.failing[LOGS]);
    }

    #[test]
    fn a_put_log_events_aws_took_is_not_sent_again_for_an_unreadable_reply() {
        let (ep, puts) = logs_answering("OK", "200 OK");
        let (mut st, mut aws, _dir) = sink_at(&ep);
        let now = clock::wall_ms();
        st.buf.push(
            &Capacity::default(),
            Vec::new(),
            vec![record("restart", now)],
            Vec::new(),
        );
        for _ in 0..3 {
            st.send_logs(&mut aws);
        }
        assert_eq!(
            puts.load(Ordering::SeqCst),
            1,
            "delivered once, not at every flush"
        );
        assert!(st.buf.logs.is_empty());
    }

    #[test]
    fn events_cloudwatch_logs_takes_but_rejects_are_counted_as_dropped() {
        // As AWS answers for events older than the group's retention.
        let (ep, _) = logs_answering(
            r#"{"rejectedLogEventsInfo":{"expiredLogEventEndIndex":2}}"#,
            "200 OK",
        );
        let (mut st, mut aws, _dir) = sink_at(&ep);
        let now = clock::wall_ms();
        let events = (0..5).map(|i| record(&format!("e{i}"), now + i)).collect();
        st.buf
            .push(&Capacity::default(), Vec::new(), events, Vec::new());
        st.send_logs(&mut aws);
        assert!(st.buf.logs.is_empty());
        assert_eq!(
            (st.buf.dropped, st.buf.dropped_total),
            (2, 2),
            "reported as DroppedDatapoints at the next flush"
        );
    }

    #[test]
    fn a_fleet_topic_arn_is_built_from_the_caller_identity() {
        assert_eq!(
            topic_arn(
                Some("arn:aws-cn:sts::123456789012:assumed-role/web/i-1"),
                Some("123456789012"),
                "cn-north-1",
                "pmguard-web-alerts"
            )
            .as_deref(),
            Some("arn:aws-cn:sns:cn-north-1:123456789012:pmguard-web-alerts")
        );
        assert_eq!(
            topic_arn(None, Some("1"), "us-east-1", "t").as_deref(),
            Some("arn:aws:sns:us-east-1:1:t")
        );
        assert_eq!(topic_arn(Some("arn:aws:x"), None, "us-east-1", "t"), None);
    }

    #[test]
    fn calls_end_before_the_next_flush() {
        assert_eq!(op_timeout(Duration::from_secs(60)), Duration::from_secs(20));
        assert_eq!(
            op_timeout(Duration::from_secs(2)),
            Duration::from_millis(1500)
        );
        assert_eq!(
            op_timeout(Duration::from_millis(500)),
            Duration::from_millis(800)
        );
        assert!(!hostname().is_empty());
        assert!(!instance_id(None).is_empty());
    }

    #[test]
    fn a_datum_is_sent_with_its_statistics_and_resolution() {
        let d = Datum {
            name: "ResponseTime".into(),
            dims: vec![
                ("App".into(), "web".into()),
                ("InstanceId".into(), "i-1".into()),
            ],
            ts_ms: 1_795_873_501_250,
            stats: metrics::Stats {
                count: 6.0,
                sum: 60.5,
                min: 4.0,
                max: 30.0,
            },
            unit: Unit::Milliseconds,
        };
        let p = metric_params("PM2/CodeBox", [&d, &d].into_iter(), 60, 0);
        let get = |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("Namespace"), Some("PM2/CodeBox"));
        assert_eq!(get("MetricData.member.1.MetricName"), Some("ResponseTime"));
        assert_eq!(
            get("MetricData.member.1.Dimensions.member.2.Name"),
            Some("InstanceId")
        );
        assert_eq!(
            get("MetricData.member.1.Dimensions.member.2.Value"),
            Some("i-1")
        );
        assert_eq!(
            get("MetricData.member.1.Timestamp"),
            Some("2026-11-28T13:45:01.250Z")
        );
        assert_eq!(
            get("MetricData.member.1.StatisticValues.SampleCount"),
            Some("6")
        );
        assert_eq!(get("MetricData.member.1.StatisticValues.Sum"), Some("60.5"));
        assert_eq!(get("MetricData.member.1.Unit"), Some("Milliseconds"));
        assert_eq!(get("MetricData.member.2.StorageResolution"), Some("60"));
        assert_eq!(get("MetricData.member.1.Value"), None);
        assert_eq!(p.len(), 1 + 2 * 12);
    }
}
