//! Metrics, events and alerts to CloudWatch, CloudWatch Logs and SNS, with nothing lost.
//!
//! Runs only with an `[aws]` section. The monitoring threads stay synchronous: they record into
//! a `Recorder` (a short mutex, no I/O) and the event log forwards to it. One `sink` thread with a
//! current-thread tokio runtime takes what was recorded every `flush_interval`, encodes it
//! (`metrics`, `logs`, `alerts`: pure, unit-tested against AWS's documented limits), buffers it
//! (`spool`: bounded, spilled to the state directory) and delivers it in order, exactly once.

pub mod alerts;
pub mod logs;
pub mod metrics;
pub mod names;
pub mod recorder;
pub mod sink;
pub mod spool;

pub use recorder::Recorder;
pub use sink::{Sink, SinkOptions};
