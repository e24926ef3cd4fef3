//! What the agent decided, for people and machines: the event log (`events`), the status file
//! `pmguard-agent status` reads (`status`), and the state directory with the restart history
//! that survives an agent restart (`state`), and the maintenance pauses people set (`pauses`).

pub mod events;
pub mod limit;
pub mod pauses;
pub mod prometheus;
pub mod spool;
pub mod state;
pub mod status;
