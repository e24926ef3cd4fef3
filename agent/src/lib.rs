//! pmguard-agent: keeps PM2-managed services alive.
//!
//! Edges (touch the world): `pm2` (the daemon's sockets), `probe` (HTTP), `procfs` (/proc),
//! `events`/`state`/`files` (the state directory), `notify` (systemd), `clock`.
//! Middle (pure): `config` validation, `policy` decisions, CPU math.
//! Runtime: `app` (one app's check and actions), `watch` (every app's checks on one thread),
//! `daemon` (threads and signals), `check`
//! (the cron backup check), `status` (what the daemon last saw).

pub mod app;
pub mod aws;
pub mod check;
pub mod cli_support;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod duration;
pub mod events;
pub mod files;
pub mod notify;
pub mod pm2;
pub mod policy;
pub mod privilege;
pub mod probe;
pub mod procfs;
pub mod state;
pub mod status;
pub mod watch;
