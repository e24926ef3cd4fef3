//! The AWS sink thread: a current-thread tokio runtime that, every `flush_interval`, takes what
//! the workers recorded, encodes it, buffers it and delivers it with one PutMetricData, one
//! PutLogEvents and the due SNS alerts (more requests only at AWS's limits or to catch up).
//!
//! Contract with the rest of the agent:
//! - `Sink::start` never fails the agent: a sink that cannot start logs why and the agent keeps
//!   watching; nothing here ever blocks a worker (they only touch the `Recorder`).
//! - Every call has a connect timeout (1 s), a read timeout (5 s), an operation timeout below the
//!   flush interval, and standard retries with exponential backoff and jitter.
//! - While AWS is unreachable the buffer keeps everything (bounded; the oldest dropped and
//!   counted beyond it) and is spilled to `<state_dir>/spool/`; once AWS answers again it is
//!   delivered in order; an item leaves the buffer only after AWS accepted it. A request whose
//!   answer is lost may be repeated (at-least-once on the wire; no loss).
//! - `Sink::stop` flushes within a deadline, then spills what is left for the next start.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_cloudwatch::error::ProvideErrorMetadata;
use tokio::sync::Notify;

use super::alerts::{self, Alert, Limiter};
use super::logs::{self, LogRecord};
use super::metrics::{self, Datum, Unit};
use super::recorder::{Recorder, Taken};
use super::spool::{Buffer, Capacity, Spool};
use crate::clock;
use crate::config::AwsConfig;

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
    wake: Arc<Notify>,
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
        let wake = recorder.urgent();
        let calls = Arc::new(Calls::default());
        let spool = Spool::new(state_dir);
        let (s, c) = (stop.clone(), calls.clone());
        let deadline = opts.stop_deadline;
        let join = std::thread::Builder::new()
            .name("aws-sink".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(error) => {
                        tracing::error!(message = "Cannot start the AWS sink; metrics and events stay local.", %error);
                        return;
                    }
                };
                rt.block_on(run(cfg, spool, recorder, opts, s, c));
            })?;
        Ok(Sink {
            join,
            stop,
            wake,
            deadline,
            calls,
        })
    }

    /// Flushes (within the stop deadline), spills what is left, and waits for the thread.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        let until = clock::mono_now() + self.deadline.as_millis() as u64 + 2_000;
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

/// The timeouts of every call: connect 1 s, read 5 s, a whole operation (retries included)
/// below the flush interval (at least 800 ms, at most 20 s).
pub fn timeouts(flush: Duration) -> TimeoutConfig {
    let op = (flush * 3 / 4).clamp(Duration::from_millis(800), Duration::from_secs(20));
    TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(1))
        .read_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(op.min(Duration::from_secs(6)))
        .operation_timeout(op)
        .build()
}

/// Standard retries: 3 attempts, exponential backoff with jitter from 100 ms up to 2 s.
pub fn retries() -> RetryConfig {
    RetryConfig::standard()
        .with_max_attempts(3)
        .with_initial_backoff(Duration::from_millis(100))
        .with_max_backoff(Duration::from_secs(2))
}

struct Clients {
    cw: aws_sdk_cloudwatch::Client,
    logs: aws_sdk_cloudwatchlogs::Client,
    sns: aws_sdk_sns::Client,
    sts: aws_sdk_sts::Client,
    /// For topic ARNs: the SDK's region, else us-east-1.
    region: String,
    /// What the SDK found (config, environment, profile, IMDS), for the start-up log: `None`
    /// there says why every call fails.
    sdk_region: Option<String>,
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

struct State {
    cfg: AwsConfig,
    opts: SinkOptions,
    instance: String,
    buf: Buffer,
    spool: Spool,
    spooled: bool,
    limiter: Limiter,
    topic_arn: Option<String>,
    stream_ready: bool,
    failing: [bool; 3],
    calls: Arc<Calls>,
}

async fn run(
    cfg: AwsConfig,
    spool: Spool,
    recorder: Arc<Recorder>,
    opts: SinkOptions,
    stop: Arc<AtomicBool>,
    calls: Arc<Calls>,
) {
    let clients = connect(&cfg).await;
    let instance = match &cfg.instance_id {
        Some(i) => i.clone(),
        None => instance_id().await,
    };
    let mut st = State {
        limiter: Limiter::new(opts.alert_window_ms, 1),
        instance,
        buf: Buffer::default(),
        spooled: false,
        spool,
        topic_arn: None,
        stream_ready: false,
        failing: [false; 3],
        calls,
        cfg,
        opts,
    };
    st.load_spool();
    tracing::info!(message = "AWS sink started.", region = ?clients.sdk_region, namespace = %st.cfg.namespace, log_group = %st.cfg.log_group, instance = %st.instance);
    st.serve(&clients, &recorder, &stop).await;
    // Stop: the last data (including `agent_stop`), delivered within the deadline, then spilled.
    st.intake(recorder.take());
    let deadline = st.opts.stop_deadline;
    if tokio::time::timeout(deadline, st.deliver(&clients, true))
        .await
        .is_err()
    {
        tracing::warn!(
            message = "AWS flush at stop timed out; spilling the rest.",
            pending = st.buf.len()
        );
    }
    st.persist();
    tracing::info!(
        message = "AWS sink stopped.",
        pending = st.buf.len(),
        dropped = st.buf.dropped_total,
        calls = st.calls.total()
    );
}

/// The SDK's clients, with pmguard's timeouts and retries, for the configured (or the SDK
/// chain's) region.
async fn connect(cfg: &AwsConfig) -> Clients {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(timeouts(cfg.flush_interval))
        .retry_config(retries());
    if let Some(r) = &cfg.region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    let sdk = loader.load().await;
    Clients {
        cw: aws_sdk_cloudwatch::Client::new(&sdk),
        logs: aws_sdk_cloudwatchlogs::Client::new(&sdk),
        sns: aws_sdk_sns::Client::new(&sdk),
        sts: aws_sdk_sts::Client::new(&sdk),
        region: sdk
            .region()
            .map_or_else(|| "us-east-1".to_string(), |r| r.to_string()),
        sdk_region: sdk.region().map(|r| r.to_string()),
    }
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

    /// Until stopped: every `flush_interval` everything recorded, and at once the events when
    /// an alert is waiting.
    async fn serve(&mut self, clients: &Clients, recorder: &Recorder, stop: &AtomicBool) {
        let wake = recorder.urgent();
        let flush_ms = self.cfg.flush_interval.as_millis() as u64;
        let mut next = clock::mono_now() + flush_ms;
        loop {
            let wait = Duration::from_millis(next.saturating_sub(clock::mono_now()));
            let woken = tokio::time::timeout(wait, wake.notified()).await.is_ok();
            if stop.load(Ordering::SeqCst) {
                return;
            }
            if woken {
                self.intake(recorder.take_events());
                self.deliver(clients, false).await;
                self.persist();
                continue;
            }
            next = (next + flush_ms).max(clock::mono_now() + flush_ms / 2);
            self.intake(recorder.take());
            self.deliver(clients, true).await;
            self.persist();
        }
    }
}

/// The InstanceId dimension: IMDSv2 on EC2 (unless AWS_EC2_METADATA_DISABLED), else the host name.
pub async fn instance_id() -> String {
    let disabled =
        std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    if !disabled {
        let imds = aws_config::imds::client::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .read_timeout(Duration::from_secs(1))
            .max_attempts(1)
            .build();
        let got = tokio::time::timeout(
            Duration::from_secs(3),
            imds.get("/latest/meta-data/instance-id"),
        )
        .await;
        if let Ok(Ok(id)) = got {
            let id: String = id.into();
            if !id.trim().is_empty() {
                return id.trim().to_string();
            }
        }
    }
    hostname()
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
                if let Some(a) = alerts::alert_for(&mut self.limiter, e, &self.instance) {
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
        let dropped = self.buf.push(&cap, datums, records, alerts);
        if dropped > 0 {
            tracing::warn!(
                message =
                    "AWS buffer full; dropped the oldest items (reported as DroppedDatapoints).",
                dropped,
                total = self.buf.dropped_total
            );
        }
    }

    fn note_failure(&mut self, which: usize, error: &str) {
        if !self.failing[which] {
            self.failing[which] = true;
            tracing::warn!(message = "AWS unreachable or refusing; keeping data to send later.", service = SERVICE[which], pending = self.buf.len(), %error);
        }
    }

    fn note_success(&mut self, which: usize) {
        if self.failing[which] {
            self.failing[which] = false;
            tracing::info!(
                message = "AWS reachable again; sending buffered data.",
                service = SERVICE[which]
            );
        }
    }

    /// Sends the buffer, oldest first, until it is empty or a service fails.
    async fn deliver(&mut self, c: &Clients, with_metrics: bool) {
        if with_metrics {
            self.send_metrics(c).await;
        }
        self.send_logs(c).await;
        self.send_alerts(c).await;
    }

    async fn send_metrics(&mut self, c: &Clients) {
        let resolution = if self.cfg.high_resolution { 1 } else { 60 };
        while !self.buf.metrics.is_empty() {
            // CloudWatch refuses datapoints older than two weeks.
            let now = clock::wall_ms();
            let before = self.buf.metrics.len();
            self.buf
                .metrics
                .retain(|d| d.ts_ms + logs::MAX_AGE_MS > now + 60_000);
            let stale = before - self.buf.metrics.len();
            if stale > 0 {
                self.buf.count_dropped(stale as u64);
                tracing::warn!(
                    message = "Dropped metrics older than CloudWatch accepts.",
                    dropped = stale
                );
                continue;
            }
            let n = metrics::next_request_len(self.buf.metrics.iter());
            let data: Vec<_> = self
                .buf
                .metrics
                .iter()
                .take(n)
                .map(|d| to_sdk_datum(d, resolution))
                .collect();
            self.calls.put_metric_data.fetch_add(1, Ordering::Relaxed);
            let r =
                c.cw.put_metric_data()
                    .namespace(&self.cfg.namespace)
                    .set_metric_data(Some(data))
                    .send()
                    .await;
            match r {
                Ok(_) => {
                    self.buf.metrics.drain(..n);
                    self.note_success(METRICS);
                }
                Err(e) if is_refused(&e) => {
                    tracing::error!(message = "CloudWatch refused metrics; dropping them.", dropped = n, error = %describe(&e));
                    self.buf.metrics.drain(..n);
                    self.buf.count_dropped(n as u64);
                }
                Err(e) => {
                    self.note_failure(METRICS, &describe(&e));
                    return;
                }
            }
        }
    }

    async fn ensure_stream(&mut self, c: &Clients) -> Result<(), String> {
        let group = &self.cfg.log_group;
        if self.cfg.fleet.is_some() {
            // The fleet's group is provision-aws's: an instance only creates its own stream.
            return self.create_stream(c).await;
        }
        self.calls.other.fetch_add(1, Ordering::Relaxed);
        match c.logs.create_log_group().log_group_name(group).send().await {
            Ok(_) => {
                self.calls.other.fetch_add(1, Ordering::Relaxed);
                let days = self.cfg.log_retention_days as i32;
                if let Err(e) = c
                    .logs
                    .put_retention_policy()
                    .log_group_name(group)
                    .retention_in_days(days)
                    .send()
                    .await
                {
                    tracing::warn!(message = "Cannot set the log group's retention.", path = %group, error = %describe(&e));
                }
                tracing::info!(message = "Created the CloudWatch Logs group.", path = %group, retention_days = days);
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_already_exists_exception()) => {}
            Err(e) => return Err(describe(&e)),
        }
        self.create_stream(c).await
    }

    /// This instance's stream in the group (already there is fine).
    async fn create_stream(&mut self, c: &Clients) -> Result<(), String> {
        self.calls.other.fetch_add(1, Ordering::Relaxed);
        match c
            .logs
            .create_log_stream()
            .log_group_name(&self.cfg.log_group)
            .log_stream_name(&self.instance)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_already_exists_exception()) =>
            {
                Ok(())
            }
            Err(e)
                if self.cfg.fleet.is_some()
                    && e.as_service_error()
                        .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                Err(format!(
                    "CreateLogStream: the fleet's log group {} does not exist; run `pmguard provision-aws` with the fleet's config (admin credentials) to create it",
                    self.cfg.log_group
                ))
            }
            Err(e) => Err(describe(&e)),
        }
    }

    /// Drops buffered events CloudWatch Logs would refuse (older than 14 days or too far
    /// ahead); returns whether any were dropped.
    fn drop_unacceptable_logs(&mut self) -> bool {
        let now = clock::wall_ms();
        let before = self.buf.logs.len();
        self.buf.logs.retain(|r| logs::acceptable(r.ts_ms, now));
        let stale = before - self.buf.logs.len();
        if stale > 0 {
            self.buf.count_dropped(stale as u64);
            tracing::warn!(message = "Dropped events CloudWatch Logs would refuse (older than 14 days or too far ahead).", dropped = stale);
        }
        stale > 0
    }

    /// The first `n` buffered events, in the order PutLogEvents requires.
    fn log_batch(&self, n: usize) -> Vec<aws_sdk_cloudwatchlogs::types::InputLogEvent> {
        let mut batch: Vec<LogRecord> = self.buf.logs.iter().take(n).cloned().collect();
        logs::chronological(&mut batch);
        batch
            .into_iter()
            .filter_map(|r| {
                aws_sdk_cloudwatchlogs::types::InputLogEvent::builder()
                    .timestamp(r.ts_ms as i64)
                    .message(r.message)
                    .build()
                    .ok()
            })
            .collect()
    }

    async fn send_logs(&mut self, c: &Clients) {
        while !self.buf.logs.is_empty() {
            if self.drop_unacceptable_logs() {
                continue;
            }
            if !self.stream_ready {
                if let Err(error) = self.ensure_stream(c).await {
                    self.note_failure(LOGS, &error);
                    return;
                }
                self.stream_ready = true;
            }
            let n = logs::next_batch_len(self.buf.logs.iter());
            let events = self.log_batch(n);
            self.calls.put_log_events.fetch_add(1, Ordering::Relaxed);
            let r = c
                .logs
                .put_log_events()
                .log_group_name(&self.cfg.log_group)
                .log_stream_name(&self.instance)
                .set_log_events(Some(events))
                .send()
                .await;
            match r {
                Ok(out) => {
                    self.buf.logs.drain(..n);
                    self.note_success(LOGS);
                    if let Some(info) = out.rejected_log_events_info() {
                        tracing::warn!(message = "CloudWatch Logs rejected some events.", too_old = ?info.too_old_log_event_end_index(), expired = ?info.expired_log_event_end_index(), too_new = ?info.too_new_log_event_start_index());
                    }
                }
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_resource_not_found_exception()) =>
                {
                    // The group or stream was deleted under us: create it again and retry.
                    self.stream_ready = false;
                    if let Err(error) = self.ensure_stream(c).await {
                        self.note_failure(LOGS, &error);
                        return;
                    }
                    self.stream_ready = true;
                }
                Err(e) if is_refused(&e) => {
                    tracing::error!(message = "CloudWatch Logs refused events; dropping them.", dropped = n, error = %describe(&e));
                    self.buf.logs.drain(..n);
                    self.buf.count_dropped(n as u64);
                }
                Err(e) => {
                    self.note_failure(LOGS, &describe(&e));
                    return;
                }
            }
        }
    }

    /// The topic's ARN, looked up once: a fleet's topic is provision-aws's (its ARN is built,
    /// never created); a single box's is created (CreateTopic returns the existing one).
    async fn topic(&mut self, c: &Clients, topic: &str) -> Result<String, String> {
        if let Some(arn) = &self.topic_arn {
            return Ok(arn.clone());
        }
        self.calls.other.fetch_add(1, Ordering::Relaxed);
        let arn = if self.cfg.fleet.is_some() {
            let out = c
                .sts
                .get_caller_identity()
                .send()
                .await
                .map_err(|e| describe(&e))?;
            topic_arn(out.arn(), out.account(), &c.region, topic)
                .ok_or("GetCallerIdentity returned no account")?
        } else {
            let out = c
                .sns
                .create_topic()
                .name(topic)
                .send()
                .await
                .map_err(|e| describe(&e))?;
            out.topic_arn()
                .ok_or("CreateTopic returned no ARN")?
                .to_string()
        };
        self.topic_arn = Some(arn.clone());
        Ok(arn)
    }

    async fn send_alerts(&mut self, c: &Clients) {
        let Some(topic) = self.cfg.sns_topic.clone() else {
            return;
        };
        while let Some(a) = self.buf.alerts.front().cloned() {
            let arn = match self.topic(c, &topic).await {
                Ok(arn) => arn,
                Err(error) => {
                    self.note_failure(ALERTS, &error);
                    return;
                }
            };
            self.calls.publish.fetch_add(1, Ordering::Relaxed);
            let r = c
                .sns
                .publish()
                .topic_arn(&arn)
                .subject(&a.subject)
                .message(&a.message)
                .send()
                .await;
            match r {
                Ok(_) => {
                    self.buf.alerts.pop_front();
                    self.note_success(ALERTS);
                    tracing::info!(message = "Alert published.", app = %a.app, alarm = %a.subject);
                }
                Err(e) if is_refused(&e) => {
                    tracing::error!(message = "SNS refused an alert; dropping it.", app = %a.app, error = %describe(&e));
                    self.buf.alerts.pop_front();
                    self.buf.count_dropped(1);
                }
                Err(e) => {
                    self.note_failure(ALERTS, &describe(&e));
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

fn to_sdk_datum(d: &Datum, resolution: i32) -> aws_sdk_cloudwatch::types::MetricDatum {
    use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit, StatisticSet};
    let unit = match d.unit {
        Unit::None => StandardUnit::None,
        Unit::Count => StandardUnit::Count,
        Unit::Milliseconds => StandardUnit::Milliseconds,
        Unit::Percent => StandardUnit::Percent,
        Unit::Bytes => StandardUnit::Bytes,
    };
    MetricDatum::builder()
        .metric_name(&d.name)
        .set_dimensions(Some(
            d.dims
                .iter()
                .map(|(k, v)| Dimension::builder().name(k).value(v).build())
                .collect(),
        ))
        .timestamp(aws_sdk_cloudwatch::primitives::DateTime::from_millis(
            d.ts_ms as i64,
        ))
        .statistic_values(
            StatisticSet::builder()
                .sample_count(d.stats.count)
                .sum(d.stats.sum)
                .minimum(d.stats.min)
                .maximum(d.stats.max)
                .build(),
        )
        .unit(unit)
        .storage_resolution(resolution)
        .build()
}

/// An error AWS will repeat for the same request (a malformed or invalid request): retrying the
/// batch would block the queue forever, so it is dropped and counted. Throttling, expired or
/// missing credentials, access denied, 5xx and transport errors are not: the data is kept.
fn is_refused<E, R>(e: &aws_sdk_cloudwatch::error::SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata,
    R: std::fmt::Debug,
{
    use aws_sdk_cloudwatch::error::SdkError;
    let SdkError::ServiceError(se) = e else {
        return false;
    };
    let code = se.err().code().unwrap_or("");
    const KEEP: &[&str] = &[
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestExpired",
        "ExpiredToken",
        "ExpiredTokenException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "AccessDenied",
        "AccessDeniedException",
        "AuthorizationError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalFailure",
        "InternalServiceError",
        "LimitExceededException",
        "DataAlreadyAcceptedException",
    ];
    const REFUSED: &[&str] = &[
        "InvalidParameterValue",
        "InvalidParameterValueException",
        "InvalidParameterCombination",
        "InvalidParameterCombinationException",
        "InvalidParameter",
        "InvalidParameterException",
        "MissingParameter",
        "MissingRequiredParameterException",
        "ValidationError",
        "ValidationException",
        "SerializationException",
        "MalformedQueryString",
    ];
    !KEEP.contains(&code) && REFUSED.contains(&code)
}

fn describe<E, R>(e: &aws_sdk_cloudwatch::error::SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_cloudwatch::error::SdkError;
    match e {
        SdkError::ServiceError(se) => format!(
            "{}: {}",
            se.err().code().unwrap_or("error"),
            se.err().message().unwrap_or("")
        ),
        SdkError::TimeoutError(_) => "timed out".to_string(),
        SdkError::DispatchFailure(d) => {
            let kind = if d.is_timeout() {
                "timed out"
            } else if d.is_io() {
                "connection failed"
            } else {
                "dispatch failed"
            };
            match std::error::Error::source(e) {
                Some(s) => format!("{kind}: {s}"),
                None => kind.to_string(),
            }
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn timeouts_stay_below_the_flush_interval() {
        let t = timeouts(Duration::from_secs(60));
        assert_eq!(t.connect_timeout(), Some(Duration::from_secs(1)));
        assert_eq!(t.read_timeout(), Some(Duration::from_secs(5)));
        assert_eq!(t.operation_timeout(), Some(Duration::from_secs(20)));
        let t = timeouts(Duration::from_secs(2));
        assert_eq!(t.operation_timeout(), Some(Duration::from_millis(1500)));
        assert!(retries().max_attempts() >= 2);
        assert!(!hostname().is_empty());
    }

    #[test]
    fn sdk_datum_carries_statistics_and_resolution() {
        let d = Datum {
            name: "ResponseTime".into(),
            dims: vec![
                ("App".into(), "web".into()),
                ("InstanceId".into(), "i-1".into()),
            ],
            ts_ms: 1_795_873_501_250,
            stats: metrics::Stats {
                count: 6.0,
                sum: 60.0,
                min: 4.0,
                max: 30.0,
            },
            unit: Unit::Milliseconds,
        };
        let s = to_sdk_datum(&d, 60);
        assert_eq!(s.metric_name(), Some("ResponseTime"));
        assert_eq!(s.dimensions().len(), 2);
        assert!(s.values().is_empty() && s.value().is_none());
        let st = s.statistic_values().unwrap();
        assert_eq!(
            (st.sample_count(), st.sum(), st.minimum(), st.maximum()),
            (Some(6.0), Some(60.0), Some(4.0), Some(30.0))
        );
        assert_eq!(s.storage_resolution(), Some(60));
        assert_eq!(
            s.timestamp().unwrap().to_millis().unwrap(),
            1_795_873_501_250
        );
    }
}
