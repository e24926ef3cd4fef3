//! pmguard-agent: keeps PM2-managed services alive.
//!
//! The modules read as the data path of one check (ARCHITECTURE.md has the whole map):
//!
//! - `config`: the TOML file, validated once into plain values (pure).
//! - `pm2`, `procfs`, `probe`: what the app looks like: PM2's view over its sockets, the
//!   processes' CPU from /proc, the health endpoint over HTTP.
//! - `policy`: the decision over those values (pure; time is passed in).
//! - `runtime`: one app's check and actions (`app`, `restart`, `resurrect`), every app's checks
//!   on one thread (`watch`), the threads and signals (`daemon`), the cron backup check (`check`).
//! - `report`: what was decided, for people and machines: the event log, `status.json`, the
//!   restart history.
//! - `aws`: metrics, events and alerts to CloudWatch, CloudWatch Logs and SNS.
//! - `notify`: alerts to webhooks and Slack-compatible chats (`[[notify]]`), spooled until sent.
//! - `sys`: the few OS edges (files, privileges, pidfds, signals, systemd notify), behind safe
//!   functions.
//! - `net`: the outbound HTTP(S) client the sinks share (blocking, one deadline per request).
//! - `control`: `pause`/`resume`, maintenance pauses a person sets (through `pauses.json`).
//! - `clock`: monotonic and wall time; `cli`: what both binaries' command lines share.
#![cfg_attr(
    not(test),
    warn(
        // The agent never panics on a runtime error and a library never prints.
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::print_stdout,
        clippy::print_stderr,
        // A longer function is several named steps waiting to be split (clippy.toml).
        clippy::too_many_lines
    )
)]

pub mod aws;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod net;
pub mod notify;
pub mod pm2;
pub mod policy;
pub mod probe;
pub mod procfs;
pub mod report;
pub mod runtime;
pub mod sync;
pub mod sys;
