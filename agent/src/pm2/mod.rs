//! Native client for the PM2 daemon: `rpc.sock` (request/reply) and `pub.sock` (event bus).
//!
//! Owns everything pmguard knows about PM2's wire protocol; nothing else in the agent touches the
//! sockets or runs the `pm2` CLI (each CLI call costs ~0.27 s CPU and may spawn a daemon).
//!
//! Invariants:
//! - Never spawns a PM2 daemon or any process; a missing daemon is [`Pm2Error::DaemonDown`].
//! - Every request is built by the typed encoder in [`codec`] with exactly one argument: one
//!   malformed frame makes the daemon stop, resurrect and renumber every app.
//! - pm_ids are only valid for the connection generation they were read on
//!   ([`Snapshot::generation`]); pm_id calls take that generation and fail with
//!   [`Pm2Error::Reconnected`] otherwise.
//! - The app environment (`pm2_env.env`) is never decoded into a value, stored, logged or printed.

pub mod bus;
pub mod client;
pub mod codec;
pub mod liveness;
pub mod types;

pub use bus::{Bus, Link};
pub use client::Client;
pub use liveness::Liveness;
pub use types::{BusEvent, ExecMode, Pm2Error, Pm2Paths, ProcessEntry, Snapshot, Status};
